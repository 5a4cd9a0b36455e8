"""Pallas Mosaic TPU kernels for the linear-RNN scans.

All kernels put the sequence axis last in the grid, mark it "arbitrary" and
carry the recurrent state in a float32 VMEM scratch buffer across grid steps
(initialised under ``pl.when(first step)``, emitted under
``pl.when(last step)``); batch, head and channel tiles are "parallel".
Reverse scans walk the sequence blocks backwards through the index maps.

Inputs arrive already padded and laid out by ``api.py``; the math of one
chunk is shared with the GPU kernels (``reference.chunk_forward`` etc.).
Tiles are upcast to float32 inside the kernels (bf16 MXU inputs are a tuning
step for when TPU measurements exist).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.scan import reference as ref

Array = jax.Array
_F32 = jnp.float32


def sublanes(dtype) -> int:
  """Rows of one (sublane, 128) tile: 8 for 32-bit, 16 for 16-bit dtypes."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


# ------------------------------------------------------------------ linear_scan


def _carry_call(kernel, grid, in_specs, out_specs, out_shape, carry_shape, interpret):
  """``pl.pallas_call`` whose last grid axis walks time in order, carrying a float32
  state in one VMEM scratch of ``carry_shape``; the other grid axes are parallel."""
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM(carry_shape, _F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",) * (len(grid) - 1) + ("arbitrary",)),
      interpret=interpret)


def _scan_kernel(a_ref, b_ref, h0_ref, h_ref, hl_ref, carry, *, reverse, sub):
  """One (batch, channel tile, time block) step of h_t = a_t h_{t-1} + b_t."""
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    carry[...] = h0_ref[...].astype(_F32)

  n_sub = a_ref.shape[0] // sub
  order = range(sub - 1, -1, -1) if reverse else range(sub)

  def body(i, h):
    blk = n_sub - 1 - i if reverse else i
    rows = pl.ds(pl.multiple_of(blk * sub, sub), sub)
    a, b = a_ref[rows, :].astype(_F32), b_ref[rows, :].astype(_F32)
    out = [None] * sub
    for r in order:                       # static unroll over one sublane tile
      h = a[r:r + 1] * h + b[r:r + 1]
      out[r] = h
    h_ref[rows, :] = jnp.concatenate(out, axis=0).astype(h_ref.dtype)
    return h

  h = jax.lax.fori_loop(0, n_sub, body, carry[...])
  carry[...] = h

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    hl_ref[...] = h


def linear_scan(a: Array, b: Array, h0: Array, *, reverse: bool, block_t: int,
                block_d: int, interpret: Any) -> tuple[Array, Array]:
  """Diagonal scan kernel.

  Args:
    a, b: [B, T, D] with T % block_t == 0 and D % block_d == 0.
    h0: [B, 1, D] float32.

  Returns:
    h [B, T, D] (dtype of a * b) and the last state [B, 1, D] float32.
  """
  bsz, t, d = a.shape
  nt = t // block_t
  tix = (lambda s: nt - 1 - s) if reverse else (lambda s: s)
  seq = pl.BlockSpec((None, block_t, block_d), lambda i, j, s: (i, tix(s), j))
  state = pl.BlockSpec((None, 1, block_d), lambda i, j, s: (i, 0, j))
  kernel = functools.partial(_scan_kernel, reverse=reverse,
                             sub=min(block_t, sublanes(a.dtype)))
  out_shape = [jax.ShapeDtypeStruct(a.shape, jnp.result_type(a, b)),
               jax.ShapeDtypeStruct((bsz, 1, d), _F32)]
  return _carry_call(kernel, (bsz, d // block_d, nt), [seq, seq, state], [seq, state],
                     out_shape, (1, block_d), interpret)(a, b, h0)


# ------------------------------------------------------------- linear attention
#
# Layout (api.py): q, k [B, H, T, K]; v [B, H, T, V]; g [B, H, T, Kg], the log
# decay summed cumulatively inside each math chunk of ``chunk`` tokens;
# g_row [B, H, T // chunk, 1, chunk] (the same, as rows; per-head decay only);
# states transposed, [.., V, K]. A grid step covers ``block_t`` tokens =
# block_t // chunk math chunks (several only for the per-key decay, whose
# math chunk is the small sub-chunk).


def _attn_specs(shape_q, kg, *, block_t, block_v, chunk, has_row,
                reverse):
  """BlockSpecs of (q, k, v, g[, g_row]) for grid (B, H, V / block_v, T / block_t)."""
  nt = shape_q[2] // block_t
  tix = (lambda s: nt - 1 - s) if reverse else (lambda s: s)
  kdim = shape_q[3]
  specs = [
      pl.BlockSpec((None, None, block_t, kdim), lambda b, h, j, s: (b, h, tix(s), 0)),
      pl.BlockSpec((None, None, block_t, kdim), lambda b, h, j, s: (b, h, tix(s), 0)),
      pl.BlockSpec((None, None, block_t, block_v), lambda b, h, j, s: (b, h, tix(s), j)),
      pl.BlockSpec((None, None, block_t, kg), lambda b, h, j, s: (b, h, tix(s), 0)),
  ]
  if has_row:
    specs.append(pl.BlockSpec((None, None, block_t // chunk, 1, chunk),
                              lambda b, h, j, s: (b, h, tix(s), 0, 0)))
  return specs, tix


def _state_spec(block_v, kdim):
  return pl.BlockSpec((None, None, block_v, kdim), lambda b, h, j, s: (b, h, j, 0))


def _attn_fwd_kernel(*refs, chunk, has_row):
  q_ref, k_ref, v_ref, g_ref = refs[:4]
  grow_ref = refs[4] if has_row else None
  st0_ref, o_ref, st_ref, states_ref, carry = refs[4 + has_row:]
  step = pl.program_id(3)

  @pl.when(step == 0)
  def _():
    carry[...] = st0_ref[...]

  st = carry[...]
  ins = (q_ref, k_ref, v_ref, g_ref, grow_ref)
  for i in range(q_ref.shape[0] // chunk):
    st = ref.chunk_forward_refs(i, chunk, st, ins, o_ref, states_ref)
  carry[...] = st

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    st_ref[...] = st


def linear_attention_fwd(q, k, v, g, g_row, st0, *, chunk: int, block_t: int,
                         block_v: int, interpret: Any):
  """Forward kernel: o [B, H, T, V], final St [B, H, V, K] and the
  transposed state entering every math chunk [B, H, T // chunk, V, K]."""
  bsz, nh, t, kdim = q.shape
  vdim = v.shape[-1]
  has_row = g_row is not None
  specs, tix = _attn_specs(q.shape, g.shape[-1], block_t=block_t,
                           block_v=block_v, chunk=chunk, has_row=has_row,
                           reverse=False)
  per = block_t // chunk
  out_shape = [
      jax.ShapeDtypeStruct((bsz, nh, t, vdim), jnp.result_type(q, k, v)),
      jax.ShapeDtypeStruct((bsz, nh, vdim, kdim), _F32),
      jax.ShapeDtypeStruct((bsz, nh, t // chunk, vdim, kdim), _F32),
  ]
  out_specs = [
      specs[2],
      _state_spec(block_v, kdim),
      pl.BlockSpec((None, None, per, block_v, kdim),
                   lambda b, h, j, s: (b, h, tix(s), j, 0)),
  ]
  kernel = functools.partial(_attn_fwd_kernel, chunk=chunk, has_row=has_row)
  args = (q, k, v, g) + ((g_row,) if has_row else ()) + (st0,)
  return _carry_call(kernel, (bsz, nh, vdim // block_v, t // block_t),
                     specs + [_state_spec(block_v, kdim)], out_specs, out_shape,
                     (block_v, kdim), interpret)(*args)


def _attn_bwd_kernel(*refs, chunk, has_row):
  q_ref, k_ref, v_ref, g_ref = refs[:4]
  grow_ref = refs[4] if has_row else None
  (states_ref, do_ref, dst_ref, dq_ref, dk_ref, dv_ref, dg_ref, dst0_ref,
   carry) = refs[4 + has_row:]
  step = pl.program_id(3)

  @pl.when(step == 0)
  def _():
    carry[...] = dst_ref[...]

  dst = carry[...]
  ins = (q_ref, k_ref, v_ref, g_ref, grow_ref, states_ref, do_ref)
  outs = (dq_ref, dk_ref, dv_ref, dg_ref)
  for i in reversed(range(q_ref.shape[0] // chunk)):
    dst = ref.chunk_backward_refs(i, chunk, dst, ins, outs)
  carry[...] = dst

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    dst0_ref[...] = dst


def linear_attention_bwd(q, k, v, g, g_row, states, do, dst, *, chunk: int,
                         block_t: int, block_v: int, interpret: Any):
  """Backward kernel, walking the sequence blocks in reverse.

  Returns float32 dq, dk [B, H, V / block_v, T, K] and dg
  [B, H, V / block_v, T, Kg] (partial sums over the V tiles, to be summed),
  dv [B, H, T, V] and dSt0 [B, H, V, K].
  """
  bsz, nh, t, kdim = q.shape
  vdim, kg = v.shape[-1], g.shape[-1]
  nv = vdim // block_v
  has_row = g_row is not None
  specs, tix = _attn_specs(q.shape, kg, block_t=block_t,
                           block_v=block_v, chunk=chunk, has_row=has_row,
                           reverse=True)
  per = block_t // chunk

  def part(width):
    return pl.BlockSpec((None, None, None, block_t, width),
                        lambda b, h, j, s: (b, h, j, tix(s), 0))

  in_specs = specs + [
      pl.BlockSpec((None, None, per, block_v, kdim),
                   lambda b, h, j, s: (b, h, tix(s), j, 0)),
      specs[2],
      _state_spec(block_v, kdim),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((bsz, nh, nv, t, kdim), _F32),
      jax.ShapeDtypeStruct((bsz, nh, nv, t, kdim), _F32),
      jax.ShapeDtypeStruct((bsz, nh, t, vdim), _F32),
      jax.ShapeDtypeStruct((bsz, nh, nv, t, kg), _F32),
      jax.ShapeDtypeStruct((bsz, nh, vdim, kdim), _F32),
  ]
  out_specs = [part(kdim), part(kdim), specs[2], part(kg),
               _state_spec(block_v, kdim)]
  kernel = functools.partial(_attn_bwd_kernel, chunk=chunk, has_row=has_row)
  args = (q, k, v, g) + ((g_row,) if has_row else ()) + (states, do, dst)
  return _carry_call(kernel, (bsz, nh, nv, t // block_t), in_specs, out_specs, out_shape,
                     (block_v, kdim), interpret)(*args)


# ------------------------------------------------------------------- delta rule


def _delta_fwd_kernel(q_ref, k_ref, v_ref, b_ref, brow_ref, g_ref, grow_ref,
                      st0_ref, o_ref, st_ref, carry):
  step = pl.program_id(3)

  @pl.when(step == 0)
  def _():
    carry[...] = st0_ref[...]

  o, st = ref.delta_chunk_forward(
      q_ref[...].astype(_F32), k_ref[...].astype(_F32),
      v_ref[...].astype(_F32), b_ref[...].astype(_F32),
      brow_ref[0].astype(_F32), g_ref[...], grow_ref[0], carry[...])
  o_ref[...] = o.astype(o_ref.dtype)
  carry[...] = st

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    st_ref[...] = st


def delta_rule_fwd(q, k, v, beta, beta_row, g, g_row, st0, *, chunk: int,
                   block_v: int, interpret: Any):
  """Forward kernel of the (gated) delta rule, one chunk per grid step.

  Args:
    q, k: [B, H, T, K]; v: [B, H, T, V]; beta, g: [B, H, T, 1] (g summed
      cumulatively per chunk); beta_row, g_row: [B, H, T // chunk, 1, chunk];
      st0: [B, H, V, K] float32.

  Returns:
    o [B, H, T, V] and the final transposed state [B, H, V, K] float32.
  """
  bsz, nh, t, kdim = q.shape
  vdim = v.shape[-1]
  specs, _ = _attn_specs(q.shape, 1, block_t=chunk, block_v=block_v,
                         chunk=chunk, has_row=True, reverse=False)
  q_s, k_s, v_s, col, row = specs
  state = _state_spec(block_v, kdim)
  out_shape = [jax.ShapeDtypeStruct((bsz, nh, t, vdim), jnp.result_type(q, k, v)),
               jax.ShapeDtypeStruct((bsz, nh, vdim, kdim), _F32)]
  return _carry_call(_delta_fwd_kernel, (bsz, nh, vdim // block_v, t // chunk),
                     [q_s, k_s, v_s, col, row, col, row, state], [v_s, state],
                     out_shape, (block_v, kdim), interpret)(q, k, v, beta, beta_row, g, g_row, st0)
