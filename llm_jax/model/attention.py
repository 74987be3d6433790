"""Causal self-attention kernels, picked by `model.attention`; all compute the same function.

- xla:   jax.nn.dot_product_attention(implementation="xla"), the reference.
- cudnn: jax.nn.dot_product_attention(implementation="cudnn"), flash attention on NVIDIA GPUs.
- blocked: causal attention tiled over query blocks in plain JAX: block i attends only to keys
  0..end of block i, so the tiles above the diagonal are never computed (for 4 blocks, 10 of 16
  tiles), and the scores are laid out [batch, kv_heads, group, query, key] for contiguous batched
  matmuls. Its backward is written out (flash attention's: scores recomputed from the saved
  log-sum-exp). On 2 CPU cores (8 x 256 tokens, 6 heads of 64, bfloat16) fwd + bwd takes 17 ms
  against 44 ms for the reference.
- splash: the Pallas splash-attention kernel for TPUs (jax.experimental.pallas.ops.tpu), causal
  and segment masks included, blocks that the masks empty skipped; one MQA kernel per kv head
  covers GQA. A Pallas call is opaque to XLA's partitioner, so under a mesh it runs inside
  jax.shard_map, split over batch and heads like the activations. Off TPU it runs in Pallas
  interpret mode (slow: for tests). Sequences that are not a multiple of 128 use xla.
- auto: cudnn on NVIDIA GPUs, splash on TPUs, blocked on CPU, xla elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.model.context_parallel import attention_specs, context_shards
from llm_jax.model.device import saved, target_device

SPLASH_BLOCK = 512  # query / key block of the splash kernel (smaller sequences: one block)


def kernel_for(impl: str, platform: str, device_kind: str, seq_len: int, packed: bool, dtype) -> str:
    """The kernel a step really runs: auto resolved for the platform, splash only for whole
    128-multiple sequences, and cuDNN only for 16-bit inputs without segments (its jax API takes no
    segment mask, so packed batches, i.e. every pretraining and SFT batch, run the XLA kernel on GPUs)."""
    if impl == "auto":
        if platform == "gpu" and "nvidia" in device_kind.lower():
            impl = "cudnn"
        else:
            impl = {"tpu": "splash", "cpu": "blocked"}.get(platform, "xla")
    if (impl == "splash" and seq_len % 128) or (impl == "cudnn" and (packed or jnp.dtype(dtype).itemsize != 2)):
        return "xla"
    return impl


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, impl: str, segments: jax.Array | None = None
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H] (K divides N) -> [B, T, N, H]; token t sees tokens <= t.

    segments [B, T] int (packed examples): token t then sees only earlier tokens of its own segment.
    """
    device = target_device()
    impl = kernel_for(impl, device.platform, device.device_kind, q.shape[1], segments is not None, q.dtype)
    if impl == "splash":
        return _splash(q, k, v, segments)
    if impl == "blocked":
        return _blocked(q, k, v, segments)
    if segments is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    same = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation=impl)


def cached_attention(q: jax.Array, k: jax.Array, v_t: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Decoding: q [B, T, N, H] at positions q_pos [B, T] against a cache of keys k [B, K, S, H] and
    values v_t [B, K, H, S] (transposed): both matmuls contract their operands' last axes -> [B, T, N, H]."""
    b, t, n, h = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * h**-0.5
    visible = jnp.arange(k.shape[2])[None, None, None, None, :] <= q_pos[:, None, None, :, None]  # [B, 1, 1, T, S]
    # masked with the lowest finite score, not -inf: a query that sees nothing (padding, at position -1
    # in a paged cache) then averages finite values instead of making NaNs that would land in the cache
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(scores.dtype).min), axis=-1).astype(v_t.dtype)
    out = jnp.einsum("bkgts,bkhs->btkgh", probs, v_t, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _blocked_layout(q, k, v):
    """q [B, T, N, H] -> [B, K, G, T, H]; k, v [B, T, K, H] -> [B, K, T, H]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    return q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _scores(qi, k, h: int):
    """[B, K, G, t, H] x [B, K, s, H] -> [B, K, G, t, s] float32, scaled by 1 / sqrt(H) in float32
    (a bfloat16 q * scale would round q once more)."""
    return jnp.einsum("bkgth,bksh->bkgts", qi, k, preferred_element_type=jnp.float32) * h**-0.5


def _query_blocks(t: int) -> list[tuple[int, int]]:
    """At most 8 query blocks of at least 64 (compile time grows with their number; on 2 CPU cores 4
    blocks of 64 at T = 256 ran fwd + bwd in 17 ms, 2 in 21, 8 in 20, one T x T block in 29)."""
    block = t if t % 64 else max(64, t // 8)
    return [(start, start + block) for start in range(0, t, block)]


def _visible(start: int, end: int, segments):
    """[block, end] causal mask of queries start..end-1, or [B, 1, 1, block, end] with segments."""
    visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    if segments is not None:
        visible = visible & (segments[:, start:end, None] == segments[:, None, :end])[:, None, None]
    return visible


@jax.custom_vjp
def _blocked(q, k, v, segments):
    return _blocked_fwd(q, k, v, segments)[0]


def _blocked_fwd(q, k, v, segments):
    """Query blocks against the keys up to their end; saves the output and the log-sum-exp per query,
    so the backward recomputes only the scores (flash attention's recipe)."""
    b, t, n, h = q.shape
    qb, kb, vb = _blocked_layout(q, k, v)
    outs, lses = [], []
    for start, end in _query_blocks(t):
        scores = jnp.where(_visible(start, end, segments), _scores(qb[:, :, :, start:end], kb[:, :, :end], h), -jnp.inf)
        high = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - high)
        total = jnp.sum(p, axis=-1, keepdims=True)
        probs = (p / total).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, vb[:, :, :end], preferred_element_type=jnp.float32))
        lses.append((high + jnp.log(total))[..., 0])
    out = saved(jnp.concatenate(outs, axis=3).astype(q.dtype), "attention_out")  # [B, K, G, T, H]
    lse = saved(jnp.concatenate(lses, axis=3), "attention_lse")  # [B, K, G, T]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), (q, k, v, segments, out, lse)


def _blocked_bwd(res, d_out):
    """Written out rather than left to autodiff: 2x faster fwd + bwd in bfloat16 on 2 CPU cores
    (8 x 256 tokens, 6 heads of 64: 17 ms against 36), whose float32 cotangents made XLA:CPU run the
    backward's matmuls in float32, and no forward recomputed (the output and log-sum-exp are saved)."""
    q, k, v, segments, out, lse = res
    b, t, n, h = q.shape
    kv = k.shape[2]
    qb, kb, vb = _blocked_layout(q, k, v)
    d_ob = d_out.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(d_ob.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    dqs, dk, dv = [], jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32)
    for start, end in _query_blocks(t):
        qi, d_oi = qb[:, :, :, start:end], d_ob[:, :, :, start:end]
        scores = _scores(qi, kb[:, :, :end], h)
        p = jnp.where(_visible(start, end, segments), jnp.exp(scores - lse[:, :, :, start:end, None]), 0.0)
        dv = dv.at[:, :, :end].add(
            jnp.einsum("bkgts,bkgth->bksh", p.astype(v.dtype), d_oi, preferred_element_type=jnp.float32)
        )
        dp = jnp.einsum("bkgth,bksh->bkgts", d_oi, vb[:, :, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, :, start:end, None]) * h**-0.5).astype(q.dtype)
        dqs.append(jnp.einsum("bkgts,bksh->bkgth", ds, kb[:, :, :end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkgts,bkgth->bksh", ds, qi, preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dqs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    dk, dv = dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@functools.cache
def _splash_kernel(t: int, group: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = min(SPLASH_BLOCK, t)
    sizes = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
    with jax.ensure_compile_time_eval():  # built once, often while tracing: its mask tables must be constants
        kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    # as numpy, the tables are constants of whatever mesh traces the kernel (abstract TPU chips included)
    kernel = jax.tree_util.tree_map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, kernel)
    return kernel, sk


def prebuild_splash(cfg: ModelConfig) -> None:
    """Builds the TPU splash kernel of cfg outside any mesh: under a mesh of abstract chips (`llm-jax
    compile`) no array can be made, and the kernel's mask tables are arrays until it is built."""
    if cfg.attention in ("auto", "splash") and cfg.seq_len % 128 == 0:
        _splash_kernel(cfg.seq_len, cfg.n_heads // cfg.n_kv_heads, False)


def _splash(q, k, v, segments):
    t, h = q.shape[1], q.shape[3]
    group = q.shape[2] // k.shape[2]
    kernel, sk = _splash_kernel(t, group, target_device().platform != "tpu")
    if segments is None:
        segments = jnp.zeros(q.shape[:2], jnp.int32)

    def local(q, k, v, segments):  # this device's rows and heads: q [b, T, n, H], k/v [b, T, kv, H]
        b, _, n, _ = q.shape
        kv = k.shape[2]
        qq = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kv, group, h).transpose(0, 2, 3, 1, 4)
        kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, T, H]

        def one(q1, k1, v1, s1):  # [group, T, H], [T, H], [T, H], [T]
            return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))

        out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qq, kk, vv, segments)  # [b, kv, group, T, H]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segments)
    specs = attention_specs()
    if context_shards()[1] > 1:
        raise ValueError("model.attention=splash needs whole sequences on each device: map `length` to no mesh axis")
    if not all(_divides(mesh, s, x.shape) for s, x in zip(specs, (q, k))):
        return causal_attention(q, k, v, "xla", segments)  # a batch smaller than its shards (e.g. at init)
    return jax.shard_map(local, in_specs=specs, out_specs=specs[0], check_vma=False)(q, k, v, segments)


def _divides(mesh, spec, shape) -> bool:
    for axes, size in zip(spec, shape):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        if size % n:
            return False
    return True
