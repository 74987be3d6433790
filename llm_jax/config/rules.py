"""Logical axis rules: which mesh axes each of the model's named dimensions is split over.

One table, chosen by the config key mesh.rules: a preset below or a YAML file of the same form.
Pure Python, so a config is checked before JAX is imported.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llm_jax.errors import UserError

MESH_AXES = ("data", "pipeline", "fsdp", "expert", "context", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "experts")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# layers: a stage's layers on its devices; length: the sequence over the context axis (size 1: whole); experts:
# the MoE experts over the expert axis, which also splits the batch outside the MoE layers (size 1: neither)
_BATCH = {"batch": ("data", "fsdp", "expert"), "layers": "pipeline", "length": "context", "experts": "expert"}
_TENSOR = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
PRESETS: dict[str, dict] = {
    "dp": _BATCH,  # replicated parameters (but for pipeline stages), batch over data x fsdp
    "fsdp": {**_BATCH, "embed": "fsdp"},  # + parameters and optimizer state split over fsdp
    "tp": {**_BATCH, **_TENSOR},  # + heads, kv_heads, mlp, vocab split over tensor
    "fsdp_tp": {**_BATCH, "embed": "fsdp", **_TENSOR},
    "ep": _BATCH,  # expert parallelism alone: dp's table, named for it (every preset splits experts over `expert`)
}


def rules_table(spec: str) -> Rules:
    """A preset name or a YAML file {logical name: mesh axis | [mesh axes] | null} -> the rules table.

    Logical names a table leaves out are replicated.
    """
    if spec in PRESETS:
        table, origin = PRESETS[spec], f"preset {spec!r}"
    elif spec.endswith((".yaml", ".yml")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"mesh.rules file {path} not found")
        table, origin = yaml.safe_load(path.read_text()) or {}, str(path)
        if not isinstance(table, dict):
            raise UserError(f"{path} must map logical axis names to mesh axes, e.g. 'embed: fsdp'")
    else:
        raise UserError(f"mesh.rules={spec!r} is neither a preset ({', '.join(PRESETS)}) nor a .yaml rules file")
    rules = []
    for name, axes in table.items():
        if name not in LOGICAL_AXES:
            raise UserError(f"{origin}: unknown logical axis {name!r}; the model's axes are {', '.join(LOGICAL_AXES)}")
        for axis in as_tuple(axes):
            if axis not in MESH_AXES:
                raise UserError(
                    f"{origin}: {name} maps to unknown mesh axis {axis!r}; mesh axes are {', '.join(MESH_AXES)}"
                )
        rules.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(rules) + tuple((n, None) for n in LOGICAL_AXES if n not in table)


def as_tuple(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
