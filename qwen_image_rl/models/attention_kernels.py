"""Pallas TPU flash attention for the MMDiT's joint attention, with the XLA path as fallback.

The joint attention is non-causal over [text, image] tokens with a key mask for padded text.
The Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.flash_attention`, forward and backward
kernels) never materialises the [B, H, S, S] logits in HBM, where the XLA path writes them
(or, chunked, [B, H, chunk, S]) once per block and pass. Its key mask is expressed as segment
ids: every query has segment 1, real keys 1 and masked keys 0, so a query attends exactly the
unmasked keys. The sequence is padded to a multiple of the block size with masked keys (padded
queries are sliced off).

A Pallas call is opaque to XLA's SPMD partitioner, so under a mesh the kernel runs inside
`shard_map` over the batch and head axes (attention is independent per sample and head): each
chip attends its own samples and heads with no communication.

Mosaic cannot contract bf16 operands at fp32 precision: under a global 'highest' matmul precision
(JAX_DEFAULT_MATMUL_PRECISION, as the parity tests set) bf16 kernels fail to compile, so trace
them under `jax.default_matmul_precision("default")` (the backward kernels are traced by
`jax.grad`, so the context must cover the whole step).

`attention(..., implementation="flash")` uses the kernel on TPU and the XLA path anywhere else
(tests run the kernel on CPU in Pallas' TPU interpret mode, see `interpret_mode`).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import PartitionSpec as P

from qwen_image_rl.models import layers

IMPLEMENTATIONS = ("xla", "flash")
_KERNEL_EVERYWHERE = [False]  # set by `kernel_everywhere` (AOT compiles for TPU from a CPU host)
HEAD_AXES = ("act_batch", "act_length", "act_heads", "act_kv")  # q, k, v: [B, S, H, D]


def _block_sizes(seq_len: int, block: int) -> pallas_flash.BlockSizes:
  b = min(block, seq_len)
  return pallas_flash.BlockSizes(
    block_q=b,
    block_k_major=b,
    block_k=b,
    block_b=1,
    block_q_major_dkv=b,
    block_k_major_dkv=b,
    block_k_dkv=b,
    block_q_dkv=b,
    block_k_major_dq=b,
    block_k_dq=b,
    block_q_dq=b,
  )


def flash_attention_local(q, k, v, key_mask=None, *, block: int = 512):
  """The kernel on local (unsharded) arrays. q, k, v: [B, S, H, D]; key_mask: [B, S] or None."""
  b, s, _, d = q.shape
  block = min(block, -(-s // 128) * 128)  # TPU tiles are 128 tokens; small inputs use one block
  padded = -(-s // block) * block
  mask = jnp.ones((b, s), jnp.int32) if key_mask is None else key_mask.astype(jnp.int32)
  pad = ((0, 0), (0, padded - s), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad).swapaxes(1, 2) for x in (q, k, v))  # [B, H, S', D]
  segments = pallas_flash.SegmentIds(
    q=jnp.ones((b, padded), jnp.int32), kv=jnp.pad(mask, ((0, 0), (0, padded - s)))
  )
  out = pallas_flash.flash_attention(
    q,
    k,
    v,
    segment_ids=segments,
    sm_scale=1.0 / math.sqrt(d),
    block_sizes=_block_sizes(padded, block),
  )
  return out.swapaxes(1, 2)[:, :s]


def _fit(spec: P, shape, mesh) -> P:
  """Drop mesh axes that do not divide their dimension (as the parameter shardings do)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    kept, size = [], 1
    for ax in axes:
      if dim % (size * mesh.shape[ax]) == 0:
        kept.append(ax)
        size *= mesh.shape[ax]
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def flash_attention(q, k, v, key_mask=None, *, block: int = 512):
  """The kernel, run per shard under the current mesh (`jax.set_mesh`) and logical rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return flash_attention_local(q, k, v, key_mask, block=block)
  spec = _fit(nn.logical_to_mesh_axes(HEAD_AXES), q.shape, mesh)
  spec = P(spec[0], None, spec[2], None)  # the kernel needs whole sequences and head dims
  mask_spec = P(spec[0], None)
  if key_mask is None:
    key_mask = jnp.ones(q.shape[:2], jnp.int32)
  local = jax.shard_map(
    lambda q, k, v, m: flash_attention_local(q, k, v, m, block=block),
    mesh=mesh,
    in_specs=(spec, spec, spec, mask_spec),
    out_specs=spec,
    check_vma=False,
  )
  return local(q, k, v, key_mask)


def attention(
  q,
  k,
  v,
  key_mask=None,
  *,
  implementation: str = "xla",
  query_chunk: int | None = None,
  kernel_off_tpu: bool = False,
):
  """Joint attention by `implementation` ('xla' or 'flash').

  'flash' falls back to the XLA path when the default backend is not a TPU, unless
  `kernel_off_tpu`: then the kernel is traced anyway, for Pallas' TPU interpret mode on CPU
  (the caller wraps the whole computation, backward pass included, in
  `interpret_mode()`) or for AOT compilation against a TPU topology from a CPU host.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r}: expected one of {list(IMPLEMENTATIONS)}"
    )
  on_tpu = jax.default_backend() == "tpu"
  if implementation == "flash" and (kernel_off_tpu or _KERNEL_EVERYWHERE[0] or on_tpu):
    return flash_attention(q, k, v, key_mask)
  return layers.chunked_attention(q, k, v, key_mask, query_chunk)


@contextlib.contextmanager
def kernel_everywhere():
  """Context manager: 'flash' traces the Pallas kernel whatever the default backend, as
  `kernel_off_tpu` does for one call; for AOT-compiling whole models for a TPU topology from a
  CPU host (benchmarks/aot_train_steps.py), where the model's own calls cannot pass the flag."""
  previous = _KERNEL_EVERYWHERE[0]
  _KERNEL_EVERYWHERE[0] = True
  try:
    yield
  finally:
    _KERNEL_EVERYWHERE[0] = previous


def interpret_mode():
  """Context manager: Pallas TPU kernels traced inside it run in interpret mode (CPU tests)."""
  return pltpu.force_tpu_interpret_mode()
