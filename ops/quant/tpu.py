"""Pallas TPU (Mosaic) kernels of ``quantized_matmul``.

Weights travel HBM -> VMEM as stored (int8 codes, or two 4-bit codes per
byte); each grid step widens one tile to int32, decodes it
(``reference.bit_planes`` / ``reference.decode``: shifts, masks and a
select tree, no gathers), scales it per group in float32 on the VPU, casts
it to x's dtype and feeds the MXU. The float W is never written to HBM.

- ``matmul``: weight-only int8 / int4 (symmetric, or asymmetric with the
  zero point folded into a per-group bias ``-z * s``) / nf4 / fp4. Grid
  ``(M/bm, N/bn, K/bk)``, K last and "arbitrary", a float32 VMEM
  accumulator. ``transpose=True`` computes ``g @ W^T`` (the gradient with
  respect to x) with grid ``(M/bm, K/bk, N/bn)`` from the same tiles.
- ``w8a8_matmul``: int8 activations x per-channel int8 weights on the MXU
  with an int32 accumulator; ``y = acc * sx * sw`` at the last K step. Needs
  a TPU with an int8 MXU path (v5e and later; jax-ml/jax#37367 reports v4
  rejecting int8 matmuls).

fp8 and ternary weights, and fp8 activations, take the XLA path.
Double-quantized nf4/fp4 scales are decoded by XLA before the kernel (a
[K/G, N] float32 array, 1/8 of the packed weight bytes at G = 64).

Block rules (``block_sizes_error``): ``bm`` a multiple of the sublane
count of x's dtype (8 f32, 16 bf16, 32 int8); ``bn`` divides N and is a
multiple of 128 or equals N; ``bk`` divides K, is a multiple of 128 or
equals K, and is a multiple of the group size for packed formats (a tile
holds whole groups; int8 groups may also span tiles). M is padded to a
multiple of ``bm``. Scales are passed as ``[K/bk, G_tile, N]`` (or
``[K/G, 1, N]``) so their ``(G_tile, bn)`` blocks equal full trailing dims.

Measurements: none, no TPU was available. ``TUNED_BLOCK_SIZES`` and
``MEASURED_FASTER`` are empty, so ``impl="auto"`` never picks this kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.common import pad_axis, round_up
from ops.quant.reference import PACKED_FORMATS, bit_planes, decode

KERNEL_FORMATS = ("int8", "int4", "nf4", "fp4")
X_DTYPES = (jnp.float32, jnp.bfloat16)
# device_kind -> (block_m, block_n, block_k); empty: nothing was measured.
TUNED_BLOCK_SIZES: dict[str, tuple[int, int, int]] = {}
# device_kind -> predicate "this kernel beat XLA here"; empty: never measured.
MEASURED_FASTER: dict[str, Callable[[], bool]] = {}
_MAX_TILE_BYTES = 4 * 2**20  # float32 dequantized [bk, bn] tile (VMEM budget)


def _sublanes(dtype) -> int:
  return 32 // jnp.dtype(dtype).itemsize


def block_sizes_error(bm: int, bn: int, bk: int, *, m: int, k: int, n: int,
                      group_size: int, packed: bool, x_dtype) -> str | None:
  """Why (bm, bn, bk) cannot tile an [M, K] x [K, N] problem, or None."""
  del m  # padded
  sub = _sublanes(x_dtype)
  if bm <= 0 or bm % sub:
    return f"block_m={bm} must be a positive multiple of {sub} for {jnp.dtype(x_dtype).name}"
  if bn <= 0 or n % bn or (bn % 128 and bn != n):
    return f"block_n={bn} must divide N={n} and be a multiple of 128 (or equal N)"
  if bk <= 0 or k % bk or (bk % 128 and bk != k):
    return f"block_k={bk} must divide K={k} and be a multiple of 128 (or equal K)"
  if packed and bk % group_size:
    return f"block_k={bk} must be a multiple of group_size={group_size}"
  if not packed and bk % group_size and group_size % bk:
    return f"block_k={bk} and group_size={group_size} must divide one another"
  if bk * bn * 4 > _MAX_TILE_BYTES:
    return f"block_k * block_n = {bk} * {bn} is too large for VMEM"
  return None


def default_block_sizes(m: int, k: int, n: int, *, group_size: int, packed: bool,
                        x_dtype) -> tuple[int, int, int]:
  """(bm, bn, bk) by heuristic (``BlockSizes.get_default`` tries the tuned table first)."""
  bm = min(256, round_up(max(m, 1), _sublanes(x_dtype)))
  step = math.lcm(128, group_size) if packed else 128
  fits = lambda b: k % b == 0 and (packed or b % group_size == 0 or group_size % b == 0)
  bk = next((b for b in range(max(512, step) // step * step, 0, -step) if fits(b)), k)
  bn = next((b for b in (512, 256, 128) if n % b == 0 and bk * b * 4 <= _MAX_TILE_BYTES), n)
  return bm, bn, bk


def _dequant_tile(w, s, b, *, fmt: str, symmetric: bool, group_rows: int):
  """Stored tile -> float32 [bk, bn] in K order; s, b: per-group [ng, bn]."""
  if fmt in PACKED_FORMATS:  # per group: low-nibble half, then high-nibble half
    lo, hi = (decode(p, fmt, symmetric) for p in bit_planes(w, 4))
    h = group_rows // 2
    parts = [[lo[g * h:(g + 1) * h], hi[g * h:(g + 1) * h]] for g in range(s.shape[0])]
  else:
    v = decode(w.astype(jnp.int32), fmt)
    r = group_rows
    parts = [[v[g * r:(g + 1) * r]] for g in range(s.shape[0])]
  out = []
  for g, group in enumerate(parts):
    for part in group:
      y = part * s[g:g + 1]
      out.append(y if b is None else y + b[g:g + 1])
  return out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)


def _matmul_kernel(x_ref, w_ref, s_ref, *refs, fmt, symmetric, group_rows, transpose):
  *b_ref, o_ref, acc_ref = refs
  red = pl.program_id(2)

  @pl.when(red == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  b = b_ref[0][...] if b_ref else None
  w = _dequant_tile(w_ref[...], s_ref[...], b, fmt=fmt, symmetric=symmetric,
                    group_rows=group_rows).astype(x_ref.dtype)
  contract = ((1,), (1,)) if transpose else ((1,), (0,))
  acc_ref[...] += lax.dot_general(x_ref[...], w, (contract, ((), ())),
                                  preferred_element_type=jnp.float32)

  @pl.when(red == pl.num_programs(2) - 1)
  def _out():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=(
    "fmt", "symmetric", "group_size", "block_sizes", "transpose", "out_dtype", "interpret"))
def matmul(x, values, scales, bias, *, fmt: str, symmetric: bool, group_size: int,
           block_sizes: tuple[int, int, int], transpose: bool = False,
           out_dtype=None, interpret=False) -> jax.Array:
  """Weight-only ``x @ W`` ([M, K] -> [M, N]) or, transposed, ``x @ W^T``.

  Args:
    x: [M, K] (or [M, N] with ``transpose``), float32 or bfloat16.
    values: stored codes, int8 [K, N] (int8) or [K/2, N] (packed formats).
    scales: float32 [K/G, N]; bias: float32 [K/G, N] (``-z s``) or None.
    fmt, symmetric, group_size: the weight format (``reference``).
    block_sizes: (bm, bn, bk), already validated.
    transpose: compute ``x @ W^T`` instead.
    out_dtype: output dtype (default x's).
    interpret: ``pl.pallas_call(interpret=...)``.
  """
  bm, bn, bk = block_sizes
  packed = fmt in PACKED_FORMATS
  k, n = values.shape[0] * (2 if packed else 1), values.shape[1]
  g = group_size
  m = x.shape[0]
  xp = pad_axis(x, 0, bm)
  rows = bk // 2 if packed else bk
  ng = max(bk // g, 1)
  if g >= bk:   # a tile lies inside one group (lax.div: no floor-division sign fixups)
    group_of = lambda kk: lax.div(kk, g // bk)
  else:         # a tile holds ng whole groups
    group_of = lambda kk: kk
  per_group = [a.reshape(k // max(g, bk), ng, n) for a in (scales, bias) if a is not None]

  def spec(shape, f):  # f(i, kk, j) -> block index; grid order depends on transpose
    if transpose:
      return pl.BlockSpec(shape, lambda i, kk, j: f(i, kk, j))
    return pl.BlockSpec(shape, lambda i, j, kk: f(i, kk, j))

  group_spec = spec((None, ng, bn), lambda i, kk, j: (group_of(kk), 0, j))
  if transpose:
    grid = (xp.shape[0] // bm, k // bk, n // bn)
    x_spec = spec((bm, bn), lambda i, kk, j: (i, j))
    out_spec, out_cols = spec((bm, bk), lambda i, kk, j: (i, kk)), k
  else:
    grid = (xp.shape[0] // bm, n // bn, k // bk)
    x_spec = spec((bm, bk), lambda i, kk, j: (i, kk))
    out_spec, out_cols = spec((bm, bn), lambda i, kk, j: (i, j)), n
  kernel = functools.partial(_matmul_kernel, fmt=fmt, symmetric=symmetric,
                             group_rows=min(g, bk), transpose=transpose)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((xp.shape[0], out_cols), out_dtype or x.dtype),
      grid=grid,
      in_specs=[x_spec, spec((rows, bn), lambda i, kk, j: (kk, j))]
               + [group_spec] * len(per_group),
      out_specs=out_spec,
      scratch_shapes=[pltpu.VMEM((bm, out_spec.block_shape[1]), jnp.float32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
  )(xp, values, *per_group)
  return out[:m]


def _w8a8_kernel(xq_ref, sx_ref, w_ref, s_ref, o_ref, acc_ref):
  red = pl.program_id(2)

  @pl.when(red == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(xq_ref[...], w_ref[...], preferred_element_type=jnp.int32)

  @pl.when(red == pl.num_programs(2) - 1)
  def _out():
    o_ref[...] = (acc_ref[...].astype(jnp.float32) * sx_ref[...] * s_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype", "interpret"))
def w8a8_matmul(xq, sx, values, scales, *, block_sizes: tuple[int, int, int],
                out_dtype=jnp.float32, interpret=False) -> jax.Array:
  """``(xq @ values) * sx * scales`` with int32 accumulation.

  Args:
    xq: int8 [M, K] per-token quantized activations; sx: float32 [M, 1].
    values: int8 [K, N]; scales: float32 [1, N] (per output channel).
    block_sizes: (bm, bn, bk), validated for int8 x.
  """
  bm, bn, bk = block_sizes
  m, k = xq.shape
  n = values.shape[1]
  xqp, sxp = pad_axis(xq, 0, bm), pad_axis(sx, 0, bm)
  out = pl.pallas_call(
      _w8a8_kernel,
      out_shape=jax.ShapeDtypeStruct((xqp.shape[0], n), out_dtype),
      grid=(xqp.shape[0] // bm, n // bn, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
  )(xqp, sxp, values, scales)
  return out[:m]
