"""Causal self-attention kernels, picked by `model.attention`; all compute the same function.

- xla:   jax.nn.dot_product_attention(implementation="xla"), the reference.
- cudnn: jax.nn.dot_product_attention(implementation="cudnn"), flash attention on NVIDIA GPUs.
- blocked: causal attention tiled over query blocks in plain JAX: block i attends only to keys
  0..end of block i, so the tiles above the diagonal are never computed (for 4 blocks, 10 of 16
  tiles), and the scores are laid out [batch, kv_heads, group, query, key] for contiguous batched
  matmuls. On a 2-core CPU (8 x 128 tokens, 4 heads of 64) fwd+bwd takes ~12 ms against ~25 ms
  for the reference.
- splash: the Pallas splash-attention kernel for TPUs (jax.experimental.pallas.ops.tpu), causal
  and segment masks included, blocks that the masks empty skipped; one MQA kernel per kv head
  covers GQA. A Pallas call is opaque to XLA's partitioner, so under a mesh it runs inside
  jax.shard_map, split over batch and heads like the activations. Off TPU it runs in Pallas
  interpret mode (slow: for tests). Sequences that are not a multiple of 128 use xla.
- auto: cudnn on NVIDIA GPUs, splash on TPUs, blocked on CPU, xla elsewhere.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

SPLASH_BLOCK = 512  # query / key block of the splash kernel (smaller sequences: one block)


def resolve(impl: str) -> str:
    if impl != "auto":
        return impl
    device = jax.devices()[0]
    if device.platform == "gpu" and "nvidia" in device.device_kind.lower():
        return "cudnn"
    if device.platform == "tpu":
        return "splash"
    return "blocked" if device.platform == "cpu" else "xla"


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, impl: str, segments: jax.Array | None = None
) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H] (K divides N) -> [B, T, N, H]; token t sees tokens <= t.

    segments [B, T] int (packed examples): token t then sees only earlier tokens of its own segment.
    cudnn takes no arbitrary mask here, so packed batches use the xla kernel on GPUs.
    """
    impl = resolve(impl)
    if impl == "splash" and q.shape[1] % 128 == 0:
        return _splash(q, k, v, segments)
    if impl == "splash":
        impl = "xla"
    if impl == "blocked":
        return _blocked(q, k, v, segments)
    if segments is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    same = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation="xla")


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Decoding: q [B, T, N, H] at positions q_pos [B, T] against a cache k/v [B, S, K, H]."""
    mask = jnp.arange(k.shape[1])[None, None, None, :] <= q_pos[:, None, :, None]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _blocked(q, k, v, segments):
    b, t, n, h = q.shape
    kv = k.shape[2]
    block = t if t % 64 else max(64, t // 8)  # at most 8 query blocks: compile time grows with their number
    q = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4) * jnp.asarray(h**-0.5, q.dtype)  # [B,K,G,T,H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    outs = []
    for start in range(0, t, block):
        end = start + block
        scores = jnp.einsum(
            "bkgth,bksh->bkgts", q[:, :, :, start:end], k[:, :, :end], preferred_element_type=jnp.float32
        )
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]  # [block, end]
        if segments is not None:  # [B, 1, 1, block, end]
            visible = visible & (segments[:, start:end, None] == segments[:, None, :end])[:, None, None]
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, v[:, :, :end], preferred_element_type=jnp.float32))
    out = jnp.concatenate(outs, axis=3).astype(q.dtype)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


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
    return kernel, sk


def _splash(q, k, v, segments):
    t, h = q.shape[1], q.shape[3]
    group = q.shape[2] // k.shape[2]
    kernel, sk = _splash_kernel(t, group, jax.devices()[0].platform != "tpu")
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
    spec = lambda *axes: jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(axes))  # noqa: E731
    q_spec, kv_spec = spec("batch", "length", "heads", "head_dim"), spec("batch", "length", "kv_heads", "head_dim")
    if q_spec[1] is not None:
        raise ValueError("model.attention=splash needs whole sequences on each device: map `length` to no mesh axis")
    if not all(_divides(mesh, s, x.shape) for s, x in ((q_spec, q), (kv_spec, k))):
        return causal_attention(q, k, v, "xla", segments)  # a batch smaller than its shards (e.g. at init)
    return jax.shard_map(
        local, in_specs=(q_spec, kv_spec, kv_spec, spec("batch", "length")), out_specs=q_spec, check_vma=False
    )(q, k, v, segments)


def _divides(mesh, spec, shape) -> bool:
    for axes, size in zip(spec, shape):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        if size % n:
            return False
    return True
