"""Pallas GPU (Triton) kernels of ``quantized_matmul``.

Same formats and math as ``tpu.py``; Triton style: the grid is
``(M/bm, N/bn)`` and each program walks K in steps of ``bk`` inside a
``fori_loop``, loading the stored codes of a step (``[bk/2, bn]`` bytes for
packed formats, ``[bk, bn]`` for int8) straight from global memory, decoding
them in registers (``reference.bit_planes`` / ``reference.decode``) and
accumulating ``tl.dot`` products in float32. Triton has no value slicing,
so a packed step is one group (``bk == group_size``) and its two nibble
halves are two dots against the matching halves of the x columns.

- ``matmul``: weight-only int8 / int4 (sym, asym via a bias ``-z s``) /
  nf4 / fp4; ``transpose=True`` computes ``g @ W^T`` with grid
  ``(M/bm, K/bk)`` and a loop over N.
- ``w8a8_matmul``: int8 x int8 dots with an int32 accumulator, scaled by
  ``sx * sw`` at the end.

fp8 and ternary weights, and fp8 activations, take the XLA path.

Block rules (``block_sizes_error``): Triton needs power-of-two tiles of at
least 16 (``tl.dot``); packed formats need ``bk == group_size`` (<= 256);
int8 needs ``bk`` to divide the group size, or one group (per-channel,
``group_size == K``). Ragged sizes are padded inside ``matmul`` /
``w8a8_matmul`` and the result sliced: M to a multiple of ``bm``, N to a
multiple of ``bn`` (zero codes and zero scales), and with one group K to a
multiple of ``bk`` (zero x columns and zero codes).

Always called with ``pltriton.CompilerParams`` so that a GPU picks the
Triton backend (jax 0.10.2 defaults ``pallas_call`` to Mosaic GPU).

Measurements: none, no GPU was available to this work. ``TUNED_BLOCK_SIZES``
and ``MEASURED_FASTER`` are empty, so ``impl="auto"`` never picks it.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ops.common import is_pow2, next_pow2, pad_axis
from ops.quant.reference import PACKED_FORMATS, bit_planes, decode

KERNEL_FORMATS = ("int8", "int4", "nf4", "fp4")
X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
TUNED_BLOCK_SIZES: dict[str, tuple[int, int, int]] = {}
MEASURED_FASTER: dict[str, Callable[[], bool]] = {}
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)
_NT = (((1,), (1,)), ((), ()))


def block_sizes_error(bm: int, bn: int, bk: int, *, m: int, k: int, n: int,
                      group_size: int, packed: bool, x_dtype) -> str | None:
  """Why (bm, bn, bk) cannot tile an [M, K] x [K, N] problem, or None."""
  del m, n, x_dtype  # M and N are padded; K too when it is one group
  if packed and (not is_pow2(group_size) or not 16 <= group_size <= 256):
    return (f"group_size={group_size} must be a power of two in [16, 256] for packed "
            "formats on pallas_gpu (one Triton tile per group)")
  if not packed and group_size != k and group_size % 16:
    return (f"group_size={group_size} must be a multiple of 16 on pallas_gpu (a power-of-two "
            "Triton tile >= 16 per step), or equal K (per channel)")
  for name, v in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
    if not (v >= 16 and is_pow2(v)):
      return f"{name}={v} must be a power of two >= 16 (Triton)"
  if packed and bk != group_size:
    return f"block_k={bk} must equal group_size={group_size} for packed formats"
  if not packed and group_size % bk and group_size != k:
    return (f"group_size={group_size} must be a multiple of block_k={bk} (a power of two "
            ">= 16) on pallas_gpu, or equal K (per channel)")
  return None


def default_block_sizes(m: int, k: int, n: int, *, group_size: int, packed: bool,
                        x_dtype) -> tuple[int, int, int]:
  """(bm, bn, bk) by heuristic (``BlockSizes.get_default`` tries the tuned table first)."""
  bm = min(64, max(16, next_pow2(m)))
  # Untuned: the widest N tile that still gives >= 128 programs (an H100 has
  # 132 SMs; small-M decode is otherwise a handful of programs), else 16.
  m_blocks = -(-max(m, 1) // bm)
  # A ragged N is padded to a multiple of the tile.
  widths = [b for b in (128, 64, 32, 16) if n % b == 0] or [min(128, max(16, next_pow2(n)))]
  bn = next((b for b in widths if m_blocks * -(-n // b) >= 128), widths[-1])
  if packed:
    bk = group_size
  elif group_size == k and k % 16:  # one group: K is padded to a multiple of bk
    bk = min(128, max(16, next_pow2(k)))
  else:
    bk = next((b for b in (128, 64, 32, 16) if group_size % b == 0), group_size)
  return bm, bn, bk


def _scaled(v, s, b):
  return v * s if b is None else v * s + b


def _matmul_kernel(x_ref, w_ref, s_ref, *refs, fmt, symmetric, group_size, bk):
  *b_ref, o_ref = refs
  packed = fmt in PACKED_FORMATS
  dtype = x_ref.dtype

  def body(c, acc):
    grp = pl.ds(lax.div(c * bk, group_size), 1)
    s = s_ref[grp, :]
    b = b_ref[0][grp, :] if b_ref else None
    if packed:  # one group: its low nibbles are columns [0, bk/2), high [bk/2, bk)
      h = bk // 2
      for p, plane in enumerate(bit_planes(w_ref[pl.ds(c * h, h), :], 4)):
        w = _scaled(decode(plane, fmt, symmetric), s, b).astype(dtype)
        acc += jnp.dot(x_ref[:, pl.ds(c * bk + p * h, h)], w, preferred_element_type=jnp.float32)
      return acc
    w = _scaled(decode(w_ref[pl.ds(c * bk, bk), :].astype(jnp.int32), fmt), s, b).astype(dtype)
    return acc + jnp.dot(x_ref[:, pl.ds(c * bk, bk)], w, preferred_element_type=jnp.float32)

  k = x_ref.shape[1]
  acc = lax.fori_loop(0, k // bk, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _matmul_t_kernel(g_ref, w_ref, s_ref, *refs, fmt, symmetric, bn):
  *b_ref, o_ref = refs
  packed = fmt in PACKED_FORMATS
  dtype = g_ref.dtype
  rows = w_ref.shape[0]

  def body(j, accs):
    cols = pl.ds(j * bn, bn)
    g = g_ref[:, cols]
    s = s_ref[:, cols]
    b = b_ref[0][:, cols] if b_ref else None
    w = w_ref[:, cols]
    planes = bit_planes(w, 4) if packed else [w.astype(jnp.int32)]
    return tuple(
        acc + lax.dot_general(g, _scaled(decode(p, fmt, symmetric), s, b).astype(dtype), _NT,
                              preferred_element_type=jnp.float32)
        for acc, p in zip(accs, planes))

  n = g_ref.shape[1]
  zeros = tuple(jnp.zeros((o_ref.shape[0], rows), jnp.float32) for _ in range(2 if packed else 1))
  accs = lax.fori_loop(0, n // bn, body, zeros)
  for p, acc in enumerate(accs):
    o_ref[:, pl.ds(p * rows, rows)] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "fmt", "symmetric", "group_size", "block_sizes", "transpose", "out_dtype", "interpret"))
def matmul(x, values, scales, bias, *, fmt: str, symmetric: bool, group_size: int,
           block_sizes: tuple[int, int, int], transpose: bool = False,
           out_dtype=None, interpret=False) -> jax.Array:
  """Weight-only ``x @ W`` ([M, K] -> [M, N]) or, transposed, ``x @ W^T``.

  Arguments as ``tpu.matmul``.
  """
  bm, bn, bk = block_sizes
  packed = fmt in PACKED_FORMATS
  k0, n0 = values.shape[0] * (2 if packed else 1), values.shape[1]
  m = x.shape[0]
  # Ragged N: zero codes with zero scales (and bias) are zero weights. Ragged
  # K (one group only, int8): zero codes and zero x columns add nothing.
  values = pad_axis(values, 1, bn)
  group = [pad_axis(a, 1, bn) for a in (scales, bias) if a is not None]
  if not packed and k0 % bk:
    values = pad_axis(values, 0, bk)
  k, n = values.shape[0] * (2 if packed else 1), values.shape[1]
  xp = pad_axis(pad_axis(x, 0, bm), 1, n if transpose else k)
  if transpose:
    rows = bk // 2 if packed else bk
    grid = (xp.shape[0] // bm, k // bk)
    in_specs = [pl.BlockSpec((bm, n), lambda i, kk: (i, 0)),
                pl.BlockSpec((rows, n), lambda i, kk: (kk, 0))]
    in_specs += [pl.BlockSpec((1, n), lambda i, kk: (lax.div(kk * bk, group_size), 0))] * len(group)
    out_spec, out_cols = pl.BlockSpec((bm, bk), lambda i, kk: (i, kk)), k
    kernel = functools.partial(_matmul_t_kernel, fmt=fmt, symmetric=symmetric, bn=bn)
  else:
    grid = (xp.shape[0] // bm, n // bn)
    in_specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((values.shape[0], bn), lambda i, j: (0, j))]
    in_specs += [pl.BlockSpec((k // group_size, bn), lambda i, j: (0, j))] * len(group)
    out_spec, out_cols = pl.BlockSpec((bm, bn), lambda i, j: (i, j)), n
    kernel = functools.partial(_matmul_kernel, fmt=fmt, symmetric=symmetric,
                               group_size=group_size, bk=bk)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((xp.shape[0], out_cols), out_dtype or x.dtype),
      grid=grid, in_specs=in_specs, out_specs=out_spec,
      compiler_params=_PARAMS, interpret=interpret,
  )(xp, values, *group)
  return out[:m, :k0 if transpose else n0]


def _w8a8_kernel(xq_ref, sx_ref, w_ref, s_ref, o_ref, *, bk):
  def body(c, acc):
    return acc + jnp.dot(xq_ref[:, pl.ds(c * bk, bk)], w_ref[pl.ds(c * bk, bk), :],
                         preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, xq_ref.shape[1] // bk, body, jnp.zeros(o_ref.shape, jnp.int32))
  o_ref[...] = (acc.astype(jnp.float32) * sx_ref[...] * s_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype", "interpret"))
def w8a8_matmul(xq, sx, values, scales, *, block_sizes: tuple[int, int, int],
                out_dtype=jnp.float32, interpret=False) -> jax.Array:
  """``(xq @ values) * sx * scales`` with int32 accumulation (see ``tpu.w8a8_matmul``)."""
  bm, bn, bk = block_sizes
  m, n0 = xq.shape[0], values.shape[1]
  # Ragged N: zero codes and scales, sliced off; ragged K (one group): zeros.
  values, scales = pad_axis(pad_axis(values, 1, bn), 0, bk), pad_axis(scales, 1, bn)
  k, n = values.shape
  xqp, sxp = pad_axis(pad_axis(xq, 0, bm), 1, bk), pad_axis(sx, 0, bm)
  out = pl.pallas_call(
      functools.partial(_w8a8_kernel, bk=bk),
      out_shape=jax.ShapeDtypeStruct((xqp.shape[0], n), out_dtype),
      grid=(xqp.shape[0] // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
                pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                pl.BlockSpec((1, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=_PARAMS, interpret=interpret,
  )(xqp, sxp, values, scales)
  return out[:m, :n0]
