"""The device mesh and the one table that maps the model's logical axis names onto it.

Layers name their axes (embed, heads, mlp, vocab, batch, ...); RULES says which mesh axis each
name is split over. A name whose mesh axis is already taken by an earlier dimension of the same
array stays unsplit (flax resolves rules in order), so activations [batch, length, embed] shard
batch over data x fsdp while the parameter [vocab, embed] shards embed over fsdp: ZeRO-3/FSDP.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.config import MeshConfig
from llm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}: the fixed sizes multiply to "
                            f"{known}, which does not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} needs {math.prod(sizes)} devices "
                        f"but {n_devices} are present; make the sizes multiply to {n_devices} or set one to -1")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils cannot lay out
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=RULES):
    """The mesh and rules that the model's logical constraints resolve against while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree, mesh: Mesh, rules=RULES):
    """Shardings for a tree whose leaves may be flax LogicallyPartitioned boxes (others: replicated)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def sharding_for(mesh: Mesh, logical_axes: tuple[str | None, ...], rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_divisor(mesh: Mesh) -> int:
    """The number of shards a batch dimension is split into."""
    spec = nn.logical_to_mesh_axes(("batch",), RULES)[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return math.prod(mesh.shape[a] for a in axes)


def put_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local rows -> global arrays sharded over the batch axis (every host passes its own rows)."""
    def put(x):
        sharding = sharding_for(mesh, ("batch",) + (None,) * (x.ndim - 1))
        return jax.make_array_from_process_local_data(sharding, x)
    return {k: put(v) for k, v in local.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
