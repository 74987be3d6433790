"""The device mesh, the layout (mesh + the rules table that maps the model's logical axis names onto
it), and what follows from a layout: parameter shardings, batch placement, fit checks.

Layers name their axes (embed, heads, mlp, vocab, batch, ...); a rules table says which mesh axes
each name is split over. A name whose mesh axis is already taken by an earlier dimension of the
same array stays unsplit (flax resolves rules in order), so under `fsdp` the activation
[batch, length, embed] splits batch over data x fsdp while the parameter [vocab, embed] splits
embed over fsdp: ZeRO-3. Swapping the table (config key mesh.rules) swaps the parallelism.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.config import Config, MeshConfig, ModelConfig
from llm_jax.config.rules import MESH_AXES, Rules, as_tuple, rules_table
from llm_jax.errors import UserError
from llm_jax.model.transformer import Transformer


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """The sizes of MESH_AXES with a -1 resolved; `data` counts all slices (dcn_data of them)."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    named = " ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(
                f"mesh {named}: the fixed sizes multiply to {known}, which does not divide the {n_devices} devices"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(
            f"mesh {named} needs {math.prod(sizes)} devices but {n_devices} are present; make the "
            f"sizes multiply to {n_devices} or set one to -1"
        )
    if sizes[0] % cfg.dcn_data:
        raise UserError(f"mesh.dcn_data={cfg.dcn_data} slices must divide the data axis ({sizes[0]})")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if cfg.dcn_data > 1:
        # Multi-slice: the data axis spans slices over the data-center network, the rest stays inside
        # a slice (ICI). Without several TPU slices (GPU and CPU hosts), each process counts as one.
        ici = (shape[0] // cfg.dcn_data, *shape[1:])
        granule = len({getattr(d, "slice_index", 0) for d in devices}) == 1
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, (cfg.dcn_data,) + (1,) * (len(MESH_AXES) - 1), devices, process_is_granule=granule
            )
        except (ValueError, AssertionError) as e:
            raise UserError(f"mesh.dcn_data={cfg.dcn_data} does not match the slices present: {e}") from None
        return Mesh(grid, MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils cannot lay out
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@dataclass(frozen=True)
class Layout:
    """A mesh and the rules that place logical axes on it: everything that decides a sharding."""

    mesh: Mesh
    rules: Rules

    @contextlib.contextmanager
    def activate(self):
        """Where the model's logical constraints resolve against this mesh and these rules."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(logical_axes, self.rules))

    def tree_shardings(self, boxed_tree):
        """Shardings for a tree whose leaves may be flax LogicallyPartitioned boxes (others: replicated)."""
        return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), self.mesh, self.rules)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def axis_size(self, logical: str) -> int:
        """How many shards a dimension with this logical name is split into (alone in its array)."""
        return shards(dict(self.mesh.shape), self.rules, logical)

    def put_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local rows -> global arrays split over the batch axis (every host passes its own rows)."""
        return {
            k: jax.make_array_from_process_local_data(self.sharding(("batch",) + (None,) * (v.ndim - 1)), v)
            for k, v in local.items()
        }

    def check(self, cfg: Config) -> None:
        """cfg's model and batch fit this mesh (the batch as the model sees it: one pipeline
        micro-batch of one gradient-accumulation micro-batch)."""
        rows = cfg.train.batch_size // cfg.train.grad_accum // cfg.mesh.pipeline_microbatches
        check_fit(dict(self.mesh.shape), self.rules, cfg.model, rows)
        context = self.axis_size("length")
        if context > 1 and cfg.model.seq_len % (2 * context):  # a context axis of -1, resolved here
            raise UserError(
                f"model.seq_len={cfg.model.seq_len} must split into 2 x {context} equal chunks (the sequence's "
                "context shards, one early and one late chunk each): change the sequence length or mesh.context"
            )


def shards(mesh_shape: dict[str, int], rules: Rules, logical: str) -> int:
    """How many shards a dimension with this logical name is split into (alone in its array)."""
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    return math.prod(mesh_shape.get(a, 1) for a in as_tuple(spec))  # an axis left out has size 1


def check_fit(mesh_shape: dict[str, int], rules: Rules, model: ModelConfig, micro_batch: int) -> None:
    """Every dimension a rule splits must divide by its shards, and every mesh axis > 1 must be used:
    one error listing each violation, before anything compiles."""
    dims = {
        "batch": micro_batch,
        "length": model.seq_len,
        "embed": model.d_model,
        "heads": model.n_heads,
        "kv_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "mlp": model.mlp_dim,
        "vocab": model.vocab_size,
        "layers": model.n_layers,
        "experts": model.moe.experts,
    }
    problems = []
    for name, size in dims.items():
        n = shards(mesh_shape, rules, name)
        if size % n:
            axes = " x ".join(
                f"{a}={mesh_shape.get(a, 1)}" for a in as_tuple(dict(rules)[name]) if mesh_shape.get(a, 1) > 1
            )
            fix = "train.batch_size / train.grad_accum" if name == "batch" else f"the model's {name} size"
            problems.append(
                f"{name}={size} is split over mesh {axes} = {n} shards, which does not divide "
                f"it: change {fix}, the mesh, or map {name} to fewer axes in mesh.rules"
            )
    unused = [a for a in MESH_AXES if mesh_shape.get(a, 1) > 1 and not any(a in as_tuple(axes) for _, axes in rules)]
    problems += [
        f"mesh.{a}={mesh_shape[a]} but the rules split nothing over {a!r}: its devices would "
        f"repeat the same work; set mesh.{a}=1 or choose rules that use it"
        for a in unused
    ]
    if problems:
        raise UserError("the mesh does not fit the model:\n  - " + "\n  - ".join(problems))


def make_layout(cfg: MeshConfig, devices: list | None = None) -> Layout:
    return Layout(make_mesh(cfg, devices), rules_table(cfg.rules))


def single_device_layout(rules: str = "fsdp_tp") -> Layout:
    """One device: generation, checkpoint inspection, tests' reference runs."""
    return make_layout(
        MeshConfig(
            data=1,
            pipeline=1,
            fsdp=1,
            expert=1,
            context=1,
            tensor=1,
            dcn_data=1,
            rules=rules,
            microbatches=0,
            pipeline_repeats=1,
        ),
        jax.devices()[:1],
    )


def abstract_params(cfg: ModelConfig, layout: Layout):
    """Shapes, dtypes and mesh shardings of the parameters, without allocating them."""
    model = Transformer(cfg)
    with layout.activate():
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32)))
    shardings = layout.tree_shardings(boxed["params"])
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed["params"]), shardings
    )


def parse_meshes(text: str) -> list[tuple[int, ...]]:
    """'8,1,1;2,2,1,2,4,1,2' -> [(8, 1, 1, 1, 0, 1, 1, 1), (2, 2, 1, 2, 4, 1, 2, 1)]: (data, fsdp, tensor,
    pipeline, microbatches, context, repeats, expert) per layout; pipeline defaults to 1, microbatches to 0
    (one per stage), context, repeats (of a circular pipeline) and expert (MoE) to 1."""
    meshes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        try:
            sizes = tuple(int(s) for s in item.split(","))
        except ValueError:
            sizes = ()
        if (
            not 3 <= len(sizes) <= 8
            or any(s == 0 or s < -1 for s in sizes[:3])
            or sizes[:3].count(-1) > 1
            or any(s < 1 for s in sizes[3:4])
            or any(s < 0 for s in sizes[4:5])
            or any(s < 1 for s in sizes[5:])
        ):
            raise UserError(
                f"mesh {item!r} in --meshes must be data,fsdp,tensor[,pipeline[,microbatches[,context[,repeats"
                "[,expert]]]]] (positive integers; one of the first three may be -1, microbatches 0 means one "
                "per stage)"
            )
        meshes.append(sizes + (1, 0, 1, 1, 1)[len(sizes) - 3 :])
    if not meshes:
        raise UserError('--meshes is empty: give layouts like "8,1,1;2,4,1;4,1,1,2,8"')
    return meshes


def mesh_scope(layout: Layout | None):
    """Where the model's logical constraints resolve against the layout (nothing to do without one)."""
    return layout.activate() if layout else contextlib.nullcontext()


def inference_layout(cfg: Config, mesh: str) -> Layout | None:
    """An inference command's --mesh 'data,fsdp,tensor' -> a Layout over the first data x fsdp x tensor of
    this host's devices, with the run's rules (None for 1,1,1: one device)."""
    layouts = parse_meshes(mesh)
    if len(layouts) != 1 or layouts[0][3:] != (1, 0, 1, 1, 1):
        raise UserError(f"--mesh {mesh!r}: give one layout data,fsdp,tensor (no pipeline stages for inference)")
    data, fsdp, tensor = layouts[0][:3]
    if (data, fsdp, tensor) == (1, 1, 1):
        return None
    devices = jax.local_devices()
    if data * fsdp * tensor > len(devices):
        raise UserError(f"--mesh {mesh} needs {data * fsdp * tensor} devices; this host has {len(devices)}")
    layout = make_layout(
        MeshConfig(
            data=data,
            pipeline=1,
            fsdp=fsdp,
            expert=1,
            context=1,
            tensor=tensor,
            dcn_data=1,
            rules=cfg.mesh.rules,
            microbatches=0,
            pipeline_repeats=1,
        ),
        devices[: data * fsdp * tensor],
    )
    check_fit(dict(layout.mesh.shape), layout.rules, cfg.model, layout.axis_size("batch"))
    return layout
