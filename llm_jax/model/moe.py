"""Mixture of experts: the routed SwiGLU MLP of an MoE layer (model.moe).

x [B, T, D] -> router logits [B, T, E] (float32) -> each token's top_k experts and weights (their scores,
normalised to sum to 1) -> the chosen experts' SwiGLU outputs, weighted and summed -> [B, T, D], plus the
shared experts' (a dense SwiGLU every token passes) where configured.

Two ways to run the experts over the N x top_k token copies:
- dropless (capacity_factor 0): the copies sorted by expert into groups padded to whole blocks of rows,
  then a grouped matmul per weight (`grouped_matmul`): every copy computed once, none dropped.
- capacity (capacity_factor c > 0): each expert takes at most C = ceil(c T top_k / E) copies of a
  sequence, in token order, so a token's slot depends on earlier tokens only (causal); a copy past C is
  dropped (the token keeps its residual and its other experts). Fixed [B, E, C, D] buffers and one
  batched matmul per weight: the Switch / GShard form, for comparison.

Expert parallelism: the rules split `experts` over the `expert` mesh axis, and every preset splits the
batch over it too. Per device (jax.shard_map), the token copies of the expert group are gathered
(all-gather over the axis), each device runs its own experts on the copies routed to them, and the
partial outputs are summed and scattered back to the tokens' devices (reduce-scatter). That moves every
token to every device of the group, EP x D values per token where an all-to-all of the routed copies
moves about top_k x D: the fixed-shape form, exact and simple; a ragged all-to-all is the step up.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.config.rules import as_tuple
from llm_jax.model.dense import param
from llm_jax.model.device import compute_dtype, on_cpu, saved

MAX_BLOCK_ROWS = 256  # rows per block of the dropless grouped matmul (fewer for small batches: block_rows)


def route(
    logits: jax.Array, top_k: int, router: str, norm_topk: bool = True, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [..., E] float32 -> scores [..., E], weights [..., k] (the top_k scores, normalised to sum 1
    where norm_topk), experts [..., k] int32 (highest score first). bias [E] (model.moe.bias_update) shifts
    which experts are chosen, not their weights."""
    scores = jax.nn.softmax(logits, axis=-1) if router == "softmax" else jax.nn.sigmoid(logits)
    _, experts = jax.lax.top_k(scores if bias is None else scores + bias, top_k)
    top = jnp.take_along_axis(scores, experts, axis=-1)
    weights = top / jnp.sum(top, axis=-1, keepdims=True) if norm_topk else top
    return scores, weights, experts.astype(jnp.int32)


def balance_loss(scores: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch's load-balancing loss E x sum_e f_e P_e: f_e the share of token copies sent to expert e,
    P_e its mean score (softmax-normalised for a sigmoid router). 1.0 at an even load, E when one expert
    takes everything; its gradient (through P) lowers the scores of overloaded experts.
    scores [N, E], experts [N, k] -> []."""
    n_experts = scores.shape[-1]
    share = expert_load(experts, n_experts) / experts.size
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return n_experts * jnp.sum(share * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss: the mean squared log-sum-exp of the logits [N, E], keeping them small."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def expert_load(experts: jax.Array, n_experts: int) -> jax.Array:
    """experts [..., k] -> token copies per expert [E] float32."""
    return jnp.zeros(n_experts, jnp.float32).at[experts.reshape(-1)].add(1.0)


def capacity_slots(experts: jax.Array, n_experts: int, capacity: int) -> jax.Array:
    """experts [B, T, k] -> each copy's slot in its expert's queue of the sequence [B, T, k] (copies in
    token order, a token's k copies in score order), or -1 where the queue already holds `capacity`."""
    b, t, k = experts.shape
    flat = experts.reshape(b, t * k)

    def row(e):
        order = jnp.argsort(e, stable=True)
        first = jnp.searchsorted(e[order], jnp.arange(n_experts))  # where each expert's copies start
        rank = jnp.arange(e.shape[0]) - first[e[order]]
        return jnp.zeros_like(e).at[order].set(rank)

    slot = jax.vmap(row)(flat).reshape(b, t, k)
    return jnp.where(slot < capacity, slot, -1)


def capacity_of(cfg: ModelConfig, seq_len: int) -> int:
    m = cfg.moe
    return max(1, math.ceil(m.capacity_factor * seq_len * m.top_k / m.experts))


def moe_mlp(module: nn.Module, y: jax.Array, out_std: float) -> tuple[jax.Array, dict]:
    """The routed experts (and shared ones) of `module` (a Block) on y [B, T, D] -> [B, T, D] in y's dtype, and
    the layer's router statistics {aux, z, load [E], dropped} (float32)."""
    cfg = module.cfg
    m, dt, d, f = cfg.moe, compute_dtype(cfg.dtype), cfg.d_model, cfg.expert_dim
    router = param(module, "router", (d, m.experts), ("embed", None), cfg.init_std)
    w_gate = param(module, "moe_gate", (m.experts, d, f), ("experts", "embed", "mlp"), cfg.init_std)
    w_up = param(module, "moe_up", (m.experts, d, f), ("experts", "embed", "mlp"), cfg.init_std)
    w_down = param(module, "moe_down", (m.experts, f, d), ("experts", "mlp", "embed"), out_std)

    logits = jnp.einsum("btd,de->bte", y.astype(jnp.float32), router)  # float32: the choice is discrete
    bias = None
    if m.bias_update:  # moved by update_router_bias after each step, never by a gradient
        bias = jax.lax.stop_gradient(param(module, "router_bias", (m.experts,), (None,), 0.0))
    scores, weights, experts = route(logits, m.top_k, m.router, m.norm_topk, bias)
    capacity = capacity_of(cfg, y.shape[1]) if m.capacity_factor else 0
    slot = capacity_slots(experts, m.experts, capacity) if capacity else jnp.zeros_like(experts)
    out = _run_experts(y, experts, weights, slot, (w_gate, w_up, w_down), dt, capacity, module)
    flat_scores, flat_experts = scores.reshape(-1, m.experts), experts.reshape(-1, m.top_k)
    stats = {
        "aux": balance_loss(flat_scores, flat_experts),
        "z": router_z_loss(logits.reshape(-1, m.experts)),
        "load": expert_load(experts, m.experts),
        "dropped": jnp.mean((slot < 0).astype(jnp.float32)),
    }
    return out, stats


def _run_experts(y, experts, weights, slot, expert_weights, dt, capacity: int, module) -> jax.Array:
    """Each device runs its experts on the copies routed to them (module docstring): [B, T, D] -> [B, T, D].
    capacity: copies per expert and sequence (0: dropless)."""
    run = functools.partial(_capacity, capacity=capacity) if capacity else _dropless
    run = functools.partial(run, dt=dt)
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else as_tuple(nn.logical_to_mesh_axes(("experts",))[0])
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if shards == 1 or module.is_initializing():
        return run(y, experts, weights, slot, *expert_weights)
    spec = lambda *names: jax.P(*nn.logical_to_mesh_axes(names))  # noqa: E731
    token_spec = spec("batch", "length", "embed")
    gather = set(axes) <= set(as_tuple(token_spec[0]))  # the batch is split over the expert axis too

    def local(y, experts, weights, slot, *ws):
        if gather:
            y, experts, weights, slot = (
                jax.lax.all_gather(a, axes, axis=0, tiled=True) for a in (y, experts, weights, slot)
            )
        first = jax.lax.axis_index(axes) * ws[0].shape[0]
        out = run(y, experts - first, weights, slot, *ws)
        if gather:
            return jax.lax.psum_scatter(out, axes, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, axes)

    route_spec = spec("batch", "length", None)
    weight_spec = jax.P(axes if len(axes) > 1 else axes[0])
    return jax.shard_map(
        local,
        in_specs=(token_spec, route_spec, route_spec, route_spec) + (weight_spec,) * 3,
        out_specs=token_spec,
        check_vma=False,
    )(y, experts, weights, slot, *expert_weights)


def _swiglu(x, w_gate, w_up, w_down, matmul):
    act = jnp.float32 if on_cpu() else x.dtype  # as the dense MLP (model/block.py): rounded once on CPU
    gate, up = matmul(x, w_gate).astype(act), matmul(x, w_up).astype(act)
    return matmul((jax.nn.silu(gate) * up).astype(x.dtype), w_down)


def _dropless(y, experts, weights, slot, w_gate, w_up, w_down, dt) -> jax.Array:
    """y [b, t, D], experts [b, t, k] (this device's experts 0 .. E_local - 1; others are not its own)."""
    b, t, d = y.shape
    k, n_local = experts.shape[-1], w_gate.shape[0]
    key = experts.reshape(-1)
    key = jnp.where((key >= 0) & (key < n_local), key, n_local)  # n_local: another device's copy
    rows = block_rows(key.shape[0], n_local)
    dest, block_expert, sizes = _block_layout(key, n_local, rows)
    total = block_expert.shape[0] * rows
    copies = jnp.repeat(y.reshape(-1, d).astype(dt), k, axis=0)  # copy i is token i // k
    x = jnp.zeros((total, d), dt).at[dest].set(copies, mode="drop")
    matmul = functools.partial(grouped_matmul, block_expert=block_expert, sizes=sizes)
    out = _swiglu(x, w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt), matmul)
    out = jnp.take(out, dest, axis=0, mode="fill", fill_value=0)  # another device's copy: 0
    combined = jnp.sum(out.reshape(b * t, k, d).astype(jnp.float32) * weights.reshape(-1, k, 1), axis=1)
    return combined.astype(y.dtype).reshape(b, t, d)


def block_rows(copies: int, experts: int) -> int:
    """Rows per block: a power of two of about a quarter of an expert's mean group, 8 to MAX_BLOCK_ROWS, so the
    padding of each group to whole blocks adds at most ~25% rows."""
    rows = 8
    while rows * 2 <= min(MAX_BLOCK_ROWS, copies / (4 * experts)):
        rows *= 2
    return rows


def _block_layout(key: jax.Array, n_experts: int, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """key [M] (expert of each copy; n_experts: not computed here) -> each copy's row in the padded buffer
    [M] (the buffer's size for an uncomputed copy), the expert of each block [blocks] (-1: an empty block
    past the groups), and the padded group sizes [E]: expert e's copies fill whole blocks of `rows`, groups
    in expert order. The block count covers any routing, so most blocks are empty under expert parallelism
    (this device computes ~1/EP of the group's copies)."""
    sizes = jnp.zeros(n_experts + 1, jnp.int32).at[key].add(1)[:n_experts]
    padded = (sizes + rows - 1) // rows * rows
    blocks = -(-key.shape[0] // rows) + n_experts  # enough for any routing: each group wastes < 1 block
    order = jnp.argsort(key, stable=True)
    ordered = key[order]
    group = jnp.minimum(ordered, n_experts - 1)
    rank = jnp.arange(key.shape[0]) - (jnp.cumsum(sizes) - sizes)[group]
    row = jnp.where(ordered < n_experts, (jnp.cumsum(padded) - padded)[group] + rank, blocks * rows)
    dest = jnp.zeros_like(key).at[order].set(row)
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(blocks) * rows, side="right")
    return dest, jnp.where(block_expert < n_experts, block_expert, -1).astype(jnp.int32), padded


def grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array, sizes: jax.Array) -> jax.Array:
    """x [blocks x rows, K] (groups of whole blocks, in expert order) @ w [E, K, N] (each block by its
    expert's matrix) -> [blocks x rows, N] in x's dtype, float32 accumulation; empty blocks give zeros.
    On accelerators one jax.lax.ragged_dot (their grouped-matmul kernels). XLA:CPU runs ragged_dot as a
    masked dense matmul per group, E times the FLOPs (measured, 4096 x 384 x 1024 bf16: 8 experts 50 ms,
    32 experts 248 ms, one dense dot 2.7 ms), so on CPU each block's expert matrix is gathered and the
    blocks multiplied as one batched matmul (empty blocks computed too: under expert parallelism most
    are; the CPU runs that in tests only). Measured at the MoE demo's shape (5,120 padded rows, 256 x
    384, 8 experts, bf16, Xeon with AMX), forward + backward: 20 ms, against 25 ms for a loop over the
    blocks and 9 ms for one dense matmul of the 4,096 copies."""
    if w.shape[0] == 1:  # one expert here: the buffer's other rows are zeros. (XLA:TPU's ragged-dot of a single
        # group failed to compile on v5e: a RET_CHECK in mask_aggregator.cc, libtpu 0.0.42.1)
        return jnp.dot(x, w[0].astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if not on_cpu():
        y = jax.lax.ragged_dot(x, w.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    return _block_matmul(x, w, block_expert)


def _blocks(x: jax.Array, w: jax.Array, block_expert: jax.Array):
    """x as [blocks, rows, K], each block's expert matrix [blocks, K, N] in x's dtype, and [blocks, 1, 1]
    True for the blocks that hold copies."""
    xb = x.reshape(block_expert.shape[0], -1, x.shape[-1])
    return xb, w.astype(x.dtype)[jnp.maximum(block_expert, 0)], (block_expert >= 0)[:, None, None]


def _block_product(x: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
    xb, wb, full = _blocks(x, w, block_expert)
    y = jnp.einsum("bmk,bkn->bmn", xb, wb, preferred_element_type=jnp.float32)
    return jnp.where(full, y, 0).astype(x.dtype).reshape(x.shape[0], -1)


@jax.custom_vjp
def _block_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
    return _block_product(x, w, block_expert)


def _block_matmul_fwd(x, w, block_expert):
    # named for the remat policy inside the forward rule, where it is not differentiated: on CPU `saved` passes
    # bfloat16 through its bits, a bitcast whose derivative is zero
    return saved(_block_product(x, w, block_expert), "matmul_out"), (x, w, block_expert)


def _block_matmul_bwd(res, g):
    """dx = g @ w[e]^T per block; dw[e] = the sum over e's blocks of x^T @ g, as a one-hot matmul (a scatter-add
    of the blocks' gradients took longer than the matmuls), all with float32 accumulation; autodiff would run
    both matmuls on the float32 cotangent."""
    x, w, block_expert = res
    xb, wb, full = _blocks(x, w, block_expert)
    gb = g.reshape(xb.shape[0], -1, g.shape[-1])
    dx = jnp.where(full, jnp.einsum("bmn,bkn->bmk", gb, wb, preferred_element_type=jnp.float32), 0)
    dw_blocks = jnp.einsum("bmk,bmn->bkn", xb, gb, preferred_element_type=jnp.float32)
    owner = (block_expert[:, None] == jnp.arange(w.shape[0])).astype(jnp.float32)  # [blocks, E]; empty: none
    dw = jnp.einsum("be,bkn->ekn", owner, dw_blocks)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype), None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _capacity(y, experts, weights, slot, w_gate, w_up, w_down, dt, capacity: int) -> jax.Array:
    """y [b, t, D], slot [b, t, k] (-1: dropped) -> [b, t, D]: per sequence, a queue of `capacity` rows per
    expert of this device, [b, E_local, C, D], one batched matmul per weight."""
    b, t, d = y.shape
    k, n_local = experts.shape[-1], w_gate.shape[0]
    mine = (experts >= 0) & (experts < n_local) & (slot >= 0)
    index = jnp.where(mine, experts * capacity + slot, n_local * capacity).reshape(b, t * k)
    copies = jnp.repeat(y.astype(dt), k, axis=1)  # [b, t k, D]: copy i is token i // k
    queues = jax.vmap(lambda i, c: jnp.zeros((n_local * capacity, d), dt).at[i].set(c, mode="drop"))(index, copies)

    def matmul(x, w):
        return jnp.einsum("becd,edf->becf", x, w, preferred_element_type=jnp.float32).astype(dt)

    queues = queues.reshape(b, n_local, capacity, d)
    out = _swiglu(queues, w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt), matmul).reshape(b, -1, d)
    got = jax.vmap(lambda o, i: jnp.take(o, i, axis=0, mode="fill", fill_value=0))(out, index)  # dropped: 0
    combined = jnp.sum(got.reshape(b, t, k, d).astype(jnp.float32) * weights[..., None], axis=2)
    return combined.astype(y.dtype)


def router_terms(cfg: ModelConfig, stats: dict) -> tuple[jax.Array, dict]:
    """The MoE layers' statistics (each [layers, ...], Block's) -> (the loss term: aux_loss x the mean balance loss
    + z_loss x the mean z-loss, per target token; the metrics: those means, the dropped share of copies, and per
    layer the coefficient of variation of the expert load and each expert's share of the copies)."""
    aux, z = jnp.mean(stats["aux"]), jnp.mean(stats["z"])
    load = stats["load"]  # [layers, E]
    share = load / jnp.sum(load, axis=-1, keepdims=True)
    cv = jnp.std(load, axis=-1) / jnp.mean(load, axis=-1)
    metrics = {"moe_aux": aux, "moe_z": z, "moe_dropped": jnp.mean(stats["dropped"]), "moe_load_cv": jnp.mean(cv)}
    every = cfg.moe.every
    for i in range(load.shape[0]):
        layer = (i + 1) * every - 1
        metrics[f"moe/layer{layer}/load_cv"] = cv[i]
        metrics |= {f"moe/layer{layer}/expert{e}": share[i, e] for e in range(load.shape[1])}
    return cfg.moe.aux_loss * aux + cfg.moe.z_loss * z, metrics


def update_router_bias(cfg: ModelConfig, params: dict, load: jax.Array) -> dict:
    """model.moe.bias_update: each MoE layer's router_bias moves by bias_update toward even load, up for the
    experts under the layer's mean load and down for those over it. load [units, E]: the step's copies per
    expert (layer order, which is the parameters' order but in a circular pipeline)."""
    step = cfg.moe.bias_update * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    layers = params["layers"]
    key = f"block_{cfg.moe.every - 1}" if cfg.moe.every > 1 else None  # the MoE layer of each BlockGroup
    owner = layers[key] if key else layers
    owner = {**owner, "router_bias": owner["router_bias"] + step.astype(owner["router_bias"].dtype)}
    return {**params, "layers": {**layers, key: owner} if key else owner}
