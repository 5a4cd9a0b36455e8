"""Pallas Triton GPU kernels for the linear-RNN scans.

One program per (batch, head, channel tile); the program walks the sequence
in a ``fori_loop`` and carries the float32 state in registers (Triton has no
cross-program scratch). Reverse scans walk the loop backwards. Every array
value is a power of two in each dimension (Triton's rule; api.py pads K, V
and D) and every matmul is at least 16 x 16 x 16.

The per-chunk math is shared with the TPU kernels (``reference.chunk_forward``
etc.). ``pltriton.CompilerParams`` is always passed: without it a GPU
``pallas_call`` lowers to Mosaic GPU in jax 0.10.2.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ops.scan import reference as ref

Array = jax.Array
_F32 = jnp.float32
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


# ------------------------------------------------------------------ linear_scan


def _scan_kernel(a_ref, b_ref, h0_ref, h_ref, hl_ref, *, reverse, unroll):
  """h_t = a_t h_{t-1} + b_t for one (batch, channel tile), all of T."""
  t = a_ref.shape[0]

  def body(i, h):
    rows = [i * unroll + r for r in range(unroll)]
    if reverse:
      rows = [t - 1 - r for r in rows]
    # Issue the loads of `unroll` rows before the dependent chain.
    a = [a_ref[r, :].astype(_F32) for r in rows]
    b = [b_ref[r, :].astype(_F32) for r in rows]
    for r, ar, br in zip(rows, a, b):
      h = ar * h + br
      h_ref[r, :] = h.astype(h_ref.dtype)
    return h

  h = jax.lax.fori_loop(0, t // unroll, body, h0_ref[0, :])
  hl_ref[0, :] = h


def linear_scan(a: Array, b: Array, h0: Array, *, reverse: bool, block_t: int,
                block_d: int, interpret: Any) -> tuple[Array, Array]:
  """Diagonal scan kernel; same contract as ``tpu.linear_scan``.

  block_t is the number of rows loaded ahead per loop step (T % block_t == 0);
  block_d the channels per program (a power of two dividing D).
  """
  bsz, t, d = a.shape
  seq = pl.BlockSpec((None, t, block_d), lambda i, j: (i, 0, j))
  state = pl.BlockSpec((None, 1, block_d), lambda i, j: (i, 0, j))
  return pl.pallas_call(
      functools.partial(_scan_kernel, reverse=reverse, unroll=block_t),
      grid=(bsz, d // block_d),
      in_specs=[seq, seq, state],
      out_specs=[seq, state],
      out_shape=[jax.ShapeDtypeStruct(a.shape, jnp.result_type(a, b)),
                 jax.ShapeDtypeStruct((bsz, 1, d), _F32)],
      compiler_params=_PARAMS,
      interpret=interpret,
  )(a, b, h0)


# ------------------------------------------------------------- linear attention
# Layout as in tpu.py: q, k [B, H, T, K]; v [B, H, T, V]; g [B, H, T, Kg]
# (cumulative per math chunk); g_row [B, H, T // chunk, 1, chunk] or None;
# states transposed [.., V, K].


def _seq_specs(q, v, kg, block_v, chunk, has_row):
  t, kdim = q.shape[2:]
  specs = [
      pl.BlockSpec((None, None, t, kdim), lambda b, h, j: (b, h, 0, 0)),
      pl.BlockSpec((None, None, t, kdim), lambda b, h, j: (b, h, 0, 0)),
      pl.BlockSpec((None, None, t, block_v), lambda b, h, j: (b, h, 0, j)),
      pl.BlockSpec((None, None, t, kg), lambda b, h, j: (b, h, 0, 0)),
  ]
  if has_row:
    specs.append(pl.BlockSpec((None, None, t // chunk, 1, chunk),
                              lambda b, h, j: (b, h, 0, 0, 0)))
  return specs


def _state_spec(block_v, kdim):
  return pl.BlockSpec((None, None, block_v, kdim), lambda b, h, j: (b, h, j, 0))


def _states_spec(n, block_v, kdim):
  return pl.BlockSpec((None, None, n, block_v, kdim),
                      lambda b, h, j: (b, h, 0, j, 0))


def _attn_fwd_kernel(*refs, chunk, has_row):
  q_ref, k_ref, v_ref, g_ref = refs[:4]
  grow_ref = refs[4] if has_row else None
  st0_ref, o_ref, st_ref, states_ref = refs[4 + has_row:]

  ins = (q_ref, k_ref, v_ref, g_ref, grow_ref)
  body = lambda n, st: ref.chunk_forward_refs(n, chunk, st, ins, o_ref, states_ref)
  st_ref[...] = jax.lax.fori_loop(0, q_ref.shape[0] // chunk, body, st0_ref[...])


def linear_attention_fwd(q, k, v, g, g_row, st0, *, chunk: int, block_t: int,
                         block_v: int, interpret: Any):
  """Forward kernel; same contract as ``tpu.linear_attention_fwd``
  (``block_t`` is unused: the loop steps one math chunk at a time)."""
  del block_t
  bsz, nh, t, kdim = q.shape
  vdim = v.shape[-1]
  has_row = g_row is not None
  specs = _seq_specs(q, v, g.shape[-1], block_v, chunk, has_row)
  args = (q, k, v, g) + ((g_row,) if has_row else ()) + (st0,)
  return pl.pallas_call(
      functools.partial(_attn_fwd_kernel, chunk=chunk, has_row=has_row),
      grid=(bsz, nh, vdim // block_v),
      in_specs=specs + [_state_spec(block_v, kdim)],
      out_specs=[specs[2], _state_spec(block_v, kdim),
                 _states_spec(t // chunk, block_v, kdim)],
      out_shape=[
          jax.ShapeDtypeStruct((bsz, nh, t, vdim), jnp.result_type(q, k, v)),
          jax.ShapeDtypeStruct((bsz, nh, vdim, kdim), _F32),
          jax.ShapeDtypeStruct((bsz, nh, t // chunk, vdim, kdim), _F32),
      ],
      compiler_params=_PARAMS,
      interpret=interpret,
  )(*args)


def _attn_bwd_kernel(*refs, chunk, has_row):
  q_ref, k_ref, v_ref, g_ref = refs[:4]
  grow_ref = refs[4] if has_row else None
  (states_ref, do_ref, dst_ref, dq_ref, dk_ref, dv_ref, dg_ref,
   dst0_ref) = refs[4 + has_row:]
  n_chunks = q_ref.shape[0] // chunk
  ins = (q_ref, k_ref, v_ref, g_ref, grow_ref, states_ref, do_ref)
  outs = (dq_ref, dk_ref, dv_ref, dg_ref)
  body = lambda i, dst: ref.chunk_backward_refs(n_chunks - 1 - i, chunk, dst, ins, outs)
  dst0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dst_ref[...])


def linear_attention_bwd(q, k, v, g, g_row, states, do, dst, *, chunk: int,
                         block_t: int, block_v: int, interpret: Any):
  """Backward kernel; same contract as ``tpu.linear_attention_bwd``."""
  del block_t
  bsz, nh, t, kdim = q.shape
  vdim, kg = v.shape[-1], g.shape[-1]
  nv = vdim // block_v
  has_row = g_row is not None
  specs = _seq_specs(q, v, kg, block_v, chunk, has_row)

  def part(width):
    return pl.BlockSpec((None, None, None, t, width),
                        lambda b, h, j: (b, h, j, 0, 0))

  args = (q, k, v, g) + ((g_row,) if has_row else ()) + (states, do, dst)
  return pl.pallas_call(
      functools.partial(_attn_bwd_kernel, chunk=chunk, has_row=has_row),
      grid=(bsz, nh, nv),
      in_specs=specs + [_states_spec(t // chunk, block_v, kdim), specs[2],
                        _state_spec(block_v, kdim)],
      out_specs=[part(kdim), part(kdim), specs[2], part(kg),
                 _state_spec(block_v, kdim)],
      out_shape=[
          jax.ShapeDtypeStruct((bsz, nh, nv, t, kdim), _F32),
          jax.ShapeDtypeStruct((bsz, nh, nv, t, kdim), _F32),
          jax.ShapeDtypeStruct((bsz, nh, t, vdim), _F32),
          jax.ShapeDtypeStruct((bsz, nh, nv, t, kg), _F32),
          jax.ShapeDtypeStruct((bsz, nh, vdim, kdim), _F32),
      ],
      compiler_params=_PARAMS,
      interpret=interpret,
  )(*args)


# ------------------------------------------------------------------- delta rule


def _delta_fwd_kernel(q_ref, k_ref, v_ref, b_ref, brow_ref, g_ref, grow_ref,
                      st0_ref, o_ref, st_ref, *, chunk):
  def body(n, st):
    rows = pl.ds(n * chunk, chunk)
    o, st = ref.delta_chunk_forward(
        q_ref[rows, :].astype(_F32), k_ref[rows, :].astype(_F32),
        v_ref[rows, :].astype(_F32), b_ref[rows, :].astype(_F32),
        brow_ref[n].astype(_F32), g_ref[rows, :], grow_ref[n], st)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return st

  st_ref[...] = jax.lax.fori_loop(0, q_ref.shape[0] // chunk, body, st0_ref[...])


def delta_rule_fwd(q, k, v, beta, beta_row, g, g_row, st0, *, chunk: int,
                   block_v: int, interpret: Any):
  """Forward kernel of the (gated) delta rule; contract of
  ``tpu.delta_rule_fwd``."""
  bsz, nh, t, kdim = q.shape
  vdim = v.shape[-1]
  q_s, k_s, v_s, col, row = _seq_specs(q, v, 1, block_v, chunk, True)
  return pl.pallas_call(
      functools.partial(_delta_fwd_kernel, chunk=chunk),
      grid=(bsz, nh, vdim // block_v),
      in_specs=[q_s, k_s, v_s, col, row, col, row, _state_spec(block_v, kdim)],
      out_specs=[v_s, _state_spec(block_v, kdim)],
      out_shape=[
          jax.ShapeDtypeStruct((bsz, nh, t, vdim), jnp.result_type(q, k, v)),
          jax.ShapeDtypeStruct((bsz, nh, vdim, kdim), _F32),
      ],
      compiler_params=_PARAMS,
      interpret=interpret,
  )(q, k, v, beta, beta_row, g, g_row, st0)
