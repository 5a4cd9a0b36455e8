"""Pallas GPU (Triton) block-sparse flash attention: forward, dq and dk/dv kernels.

One program per (query block, batch, query head) walks the query block's
list of kv blocks in a ``fori_loop`` up to the number of listed blocks,
loading each kv block by offset from the whole-sequence ref (the pattern of
FlashAttention-2 on GPU, Dao 2023); ``FULL`` blocks take the branch without
the element mask. dk/dv: one program per (kv block, batch, query head)
walks the transposed lists; per-query-head results are summed over the GQA
group in XLA (float32, ``Hq/Hkv`` x the dk/dv memory).

Triton needs power-of-two shapes: the head dim is zero-padded to a power of
two (scores unchanged), list lengths are padded with ``EMPTY`` slots and
block sizes are validated by ``BlockSizes``. Always compiled with
``pltriton.CompilerParams`` (Triton, not Mosaic GPU). Interpret mode on CPU:
``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ops import common
from ops.attention import masks as masks_lib
from ops.attention import reference

# device_kind -> (() -> bool): where this kernel was measured faster than the
# XLA path. Empty: no GPU was available to measure (impl="auto" picks "xla").
MEASURED_FASTER: dict = {}

_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _lists(layout):
  """Layout with list length padded to a power of two (EMPTY slots)."""
  pad = common.next_pow2(layout.max_blocks) - layout.max_blocks
  widths = ((0, 0),) * 3 + ((0, pad),)
  return (jnp.pad(layout.index, widths, mode="edge"), jnp.pad(layout.kind, widths))


def _list_spec(arr, row_of, head_of):
  """BlockSpec of one list ``[L]`` of a ``[B', H', R, L]`` layout array."""
  bp, hp, _, length = arr.shape
  return pl.BlockSpec((None, None, None, length), lambda *g: (
      g[1] if bp > 1 else 0, head_of(*g) if hp > 1 else 0, row_of(*g), 0))


def _pad_d(x):
  return common.pad_axis(x, x.ndim - 1, common.next_pow2(x.shape[-1]))


class _Extras:
  """Segment-id and dense-mask refs; ``tile`` yields the (bq, bk) mask tile."""

  def __init__(self, cfg, refs, has_segments):
    self.cfg = cfg
    self.seg = refs[:2] if has_segments else None
    self.tiles = refs[2:] if has_segments else refs

  def valid(self, q_block, kv_block, head, q_rows, kv_cols):
    """Element mask; ``q_rows``/``kv_cols`` slice the loaded refs to the tile."""
    cfg = self.cfg
    shape = (cfg.block_q, cfg.block_kv)
    i = q_block * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    j = kv_block * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    q_seg = kv_seg = None
    if self.seg is not None:
      q_seg = self.seg[0][q_rows][:, None]
      kv_seg = self.seg[1][kv_cols][None, :]
    mask = cfg.mask([r[q_rows, kv_cols] != 0 for r in self.tiles])
    return masks_lib.valid_pairs(mask, i, j, head, cfg.num_heads, cfg.seq_kv, lambda a: a,
                                 q_seg, kv_seg)


def _walk(kind_ref, body, carry):
  """Runs ``body(t, carry, masked)`` over the listed slots (non-empty first)."""
  count = jnp.sum((kind_ref[...] > 0).astype(jnp.int32))

  def step(t, c):
    return jax.lax.cond(kind_ref[t] == masks_lib.PARTIAL,
                        lambda c: body(t, c, True), lambda c: body(t, c, False), c)
  return jax.lax.fori_loop(0, count, step, carry)


def _extra_inputs(q_seg, kv_seg, leaves):
  segs = [] if q_seg is None else [q_seg, kv_seg]
  return segs + [a.astype(jnp.int8) for a in leaves]


# --------------------------------------------------------------------------
# Forward and dq: one program per (query block, batch, query head)


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, kind_ref, *refs, cfg, has_segments):
  *extra, o_ref, lse_ref = refs
  qi, h = pl.program_id(0), pl.program_id(2)
  ex = _Extras(cfg, extra, has_segments)
  q = q_ref[...]
  bq, bk, d = cfg.block_q, cfg.block_kv, q.shape[-1]

  def body(t, carry, masked):
    kv = idx_ref[t]
    cols = pl.ds(kv * bk, bk)
    s, _ = reference.logits(cfg, q, k_ref[cols, :])
    valid = ex.valid(qi, kv, h, slice(None), cols) if masked else None
    return reference.online_softmax_step(carry, s, v_ref[cols, :], valid)

  init = (jnp.full((bq, 1), reference.MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, d), jnp.float32))
  o, lse = reference.finalize(*_walk(kind_ref, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _row_specs(cfg, q_seg, leaves, tp, sp, d, rep):
  """In-specs shared by the forward and dq kernels (grid: qi, b, h)."""
  bq = cfg.block_q
  q_spec = pl.BlockSpec((None, bq, None, d), lambda qi, b, h: (b, qi, h, 0))
  kv_spec = pl.BlockSpec((None, sp, None, d), lambda qi, b, h: (b, 0, jax.lax.div(h, rep), 0))
  extra = []
  if q_seg is not None:
    extra += [pl.BlockSpec((None, bq), lambda qi, b, h: (b, qi)),
              pl.BlockSpec((None, sp), lambda qi, b, h: (b, 0))]
  for a in leaves:
    extra.append(pl.BlockSpec((None, bq, sp), lambda qi, b, h, hm=a.shape[0]: (
        h if hm > 1 else 0, qi, 0)))
  return q_spec, kv_spec, extra


def forward(cfg, q, k, v, q_seg, kv_seg, leaves, layout):
  """``(o [B, Tp, Hq, D], lse [B, Hq, Tp])`` over the listed kv blocks."""
  b, tp, hq, d0 = q.shape
  sp = k.shape[1]
  q, k, v = _pad_d(q), _pad_d(k), _pad_d(v)
  d = q.shape[-1]
  index, kind = _lists(layout)
  q_spec, kv_spec, extra_specs = _row_specs(cfg, q_seg, leaves, tp, sp, d, cfg.rep)
  list_specs = [_list_spec(x, lambda qi, b_, h: qi, lambda qi, b_, h: h) for x in (index, kind)]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_segments=q_seg is not None),
      grid=(tp // cfg.block_q, b, hq),
      in_specs=[q_spec, kv_spec, kv_spec, *list_specs, *extra_specs],
      out_specs=[q_spec, pl.BlockSpec((None, None, cfg.block_q), lambda qi, b_, h: (b_, h, qi))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
      compiler_params=_PARAMS, interpret=cfg.interpret,
  )(q, k, v, index, kind, *_extra_inputs(q_seg, kv_seg, leaves))
  return o[..., :d0], lse


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, kind_ref, *refs, cfg,
               has_segments):
  *extra, dq_ref = refs
  qi, h = pl.program_id(0), pl.program_id(2)
  ex = _Extras(cfg, extra, has_segments)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  bk = cfg.block_kv

  def body(t, dq, masked):
    kv = idx_ref[t]
    cols = pl.ds(kv * bk, bk)
    k = k_ref[cols, :]
    valid = ex.valid(qi, kv, h, slice(None), cols) if masked else None
    _, ds = reference.probs_and_dlogits(cfg, q, k, v_ref[cols, :], do, lse, delta, valid)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = _walk(kind_ref, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# --------------------------------------------------------------------------
# dk/dv: one program per (kv block, batch, query head)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, kind_ref, *refs, cfg,
                has_segments):
  *extra, dk_ref, dv_ref = refs
  kj, h = pl.program_id(0), pl.program_id(2)
  ex = _Extras(cfg, extra, has_segments)
  k, v = k_ref[...], v_ref[...]
  bq = cfg.block_q
  tn = (((0,), (0,)), ((), ()))   # contract the query rows: p^T do, ds^T q

  def body(t, carry, masked):
    dk, dv = carry
    qi = idx_ref[t]
    rows = pl.ds(qi * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    valid = ex.valid(qi, kj, h, rows, slice(None)) if masked else None
    p, ds = reference.probs_and_dlogits(cfg, q, k, v, do, lse_ref[rows][:, None],
                                        delta_ref[rows][:, None], valid)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32)
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _walk(kind_ref, body, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def backward(cfg, q, k, v, q_seg, kv_seg, leaves, layout, layout_t, o, lse, do):
  """``(dq, dk, dv)`` in the op's layout."""
  b, tp, hq, d0 = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  bq, bk, rep = cfg.block_q, cfg.block_kv, cfg.rep
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1).transpose(0, 2, 1)
  qp, kp, vp, dop = (_pad_d(x) for x in (q, k, v, do))
  d = qp.shape[-1]
  has_segments = q_seg is not None
  extra_in = _extra_inputs(q_seg, kv_seg, leaves)

  index, kind = _lists(layout)
  q_spec, kv_spec, extra_specs = _row_specs(cfg, q_seg, leaves, tp, sp, d, rep)
  st_spec = pl.BlockSpec((None, None, bq), lambda qi, b_, h: (b_, h, qi))
  list_specs = [_list_spec(x, lambda qi, b_, h: qi, lambda qi, b_, h: h) for x in (index, kind)]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments),
      grid=(tp // bq, b, hq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec, *list_specs, *extra_specs],
      out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=_PARAMS, interpret=cfg.interpret,
  )(qp, kp, vp, dop, lse, delta, index, kind, *extra_in)

  index_t, kind_t = _lists(layout_t)
  qs_spec = pl.BlockSpec((None, tp, None, d), lambda kj, b_, h: (b_, 0, h, 0))
  own_spec = pl.BlockSpec((None, bk, None, d), lambda kj, b_, h: (b_, kj, jax.lax.div(h, rep), 0))
  stt_spec = pl.BlockSpec((None, None, tp), lambda kj, b_, h: (b_, h, 0))
  extra_specs_t = []
  if has_segments:
    extra_specs_t += [pl.BlockSpec((None, tp), lambda kj, b_, h: (b_, 0)),
                      pl.BlockSpec((None, bk), lambda kj, b_, h: (b_, kj))]
  for a in leaves:
    extra_specs_t.append(pl.BlockSpec((None, tp, bk), lambda kj, b_, h, hm=a.shape[0]: (
        h if hm > 1 else 0, 0, kj)))
  out_spec = pl.BlockSpec((None, bk, None, d), lambda kj, b_, h: (b_, kj, h, 0))
  list_specs_t = [_list_spec(x, lambda kj, b_, h: kj, lambda kj, b_, h: h)
                  for x in (index_t, kind_t)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_segments=has_segments),
      grid=(sp // bk, b, hq),
      in_specs=[qs_spec, own_spec, own_spec, qs_spec, stt_spec, stt_spec, *list_specs_t,
                *extra_specs_t],
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((b, sp, hq, d), jnp.float32)] * 2,
      compiler_params=_PARAMS, interpret=cfg.interpret,
  )(qp, kp, vp, dop, lse, delta, index_t, kind_t, *extra_in)

  def group_sum(x, like):   # [B, Sp, Hq, D] -> [B, Sp, Hkv, D]
    return x[..., :d0].reshape(b, sp, hkv, rep, d0).sum(3).astype(like.dtype)
  return dq[..., :d0], group_sum(dk, k), group_sum(dv, v)
