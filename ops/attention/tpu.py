"""Pallas TPU (Mosaic) block-sparse flash attention: forward, dq and dk/dv kernels.

Layout: the kernels see ``[B, H, T, D]`` (q, k, v are transposed from the
op's ``[B, T, H, D]`` so every block is a ``(rows, D)`` tile that meets the
(8, 128) rule). The block lists are scalar-prefetched into SMEM, flattened
to 1-D: the grid's last axis walks the ``t``-th listed kv block of a query
block (forward, dq) or the listed query blocks of a kv block for each query
head of its GQA group (dk/dv). ``EMPTY`` slots repeat the previous block
index, so the pipeline issues no new DMA, and are skipped with ``pl.when``;
``FULL`` blocks skip the element mask. Statistics and accumulators are
float32 VMEM scratch. Follows FlashAttention-2 (Dao, 2023) and the
scalar-prefetch sparse pattern of the Pallas TPU guide.

Interpret mode on CPU: ``pltpu.InterpretParams`` (the op's ``interpret``).

Not verified on hardware (no TPU was available): the kernels run correctly
in TPU interpret mode, race-free on 2 simulated cores, and pass the JAX-side
Mosaic lowering, but libtpu's own compile (layouts of the ``(bq, 1)``
statistics and of int8 ``DenseMask`` tiles, which may need ``block_q % 32``)
and speed are unmeasured. The block lists live in SMEM: a per-batch
(segment ids, top-k) and per-head layout holds ``B * Hq * nq * L`` int32s
twice, which bounds B * Hq * T on TPU. ``jax.vmap`` of these kernels works
when lowered for TPU but not in TPU interpret mode (a jax 0.10.2 limitation
with ``dimension_semantics``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.attention import masks as masks_lib
from ops.attention import reference

# device_kind -> (() -> bool): where this kernel was measured faster than the
# XLA path. Empty: no TPU was available to measure (impl="auto" picks "xla").
MEASURED_FASTER: dict = {}

_SEMANTICS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _bhtd(x):
  return x.transpose(0, 2, 1, 3)


class _Lists:
  """Index arithmetic over a flattened ``BlockLayout`` ``[B', H', R, L]``."""

  def __init__(self, layout):
    self.bp, self.hp, self.rows, self.length = layout.index.shape
    self.index = layout.index.reshape(-1)
    self.kind = layout.kind.reshape(-1)

  def slot(self, b, h, row, t):
    b = b if self.bp > 1 else 0
    h = h if self.hp > 1 else 0
    return ((b * self.hp + h) * self.rows + row) * self.length + t


def _inputs(cfg, q_seg, kv_seg, leaves):
  """Extra kernel inputs (segment ids, dense-mask tiles) in kernel layout."""
  extra = []
  if q_seg is not None:
    extra += [q_seg[:, :, None], kv_seg[:, None, :]]
  extra += [a.astype(jnp.int8) for a in leaves]
  return extra


def _extra_specs(cfg, q_seg, leaves, q_block, kv_block, head):
  """BlockSpecs of ``_inputs`` given index functions of the grid point.

  ``q_block(*g)``/``kv_block(*g)`` give the query/kv block indices and
  ``head(*g)`` the query head at grid point ``g`` (with prefetch refs).
  """
  bq, bk = cfg.block_q, cfg.block_kv
  specs = []
  if q_seg is not None:
    specs += [pl.BlockSpec((None, bq, 1), lambda *g: (g[0], q_block(*g), 0)),
              pl.BlockSpec((None, 1, bk), lambda *g: (g[0], 0, kv_block(*g)))]
  for a in leaves:
    hm = a.shape[0]
    specs.append(pl.BlockSpec(
        (None, bq, bk),
        lambda *g, hm=hm: (head(*g) if hm > 1 else 0, q_block(*g), kv_block(*g))))
  return specs


def _valid(cfg, q_block, kv_block, head, extra_refs):
  """Element mask of the current (bq, bk) tile from iotas and loaded tiles."""
  shape = (cfg.block_q, cfg.block_kv)
  i = q_block * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  j = kv_block * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  q_seg = kv_seg = None
  if len(extra_refs) > cfg.mask_tree.num_leaves:
    q_seg, kv_seg = extra_refs[0][...], extra_refs[1][...]
    extra_refs = extra_refs[2:]
  mask = cfg.mask([r[...] != 0 for r in extra_refs])
  return masks_lib.valid_pairs(mask, i, j, head, cfg.num_heads, cfg.seq_kv, lambda a: a,
                               q_seg, kv_seg)


def _dispatch(kind, body):
  """Runs ``body(valid_needed)`` for FULL / PARTIAL slots; EMPTY does nothing."""
  pl.when(kind == masks_lib.FULL)(functools.partial(body, False))
  pl.when(kind == masks_lib.PARTIAL)(functools.partial(body, True))


# --------------------------------------------------------------------------
# Forward


def _fwd_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, *refs, cfg, lists):
  *extra, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
  b, h, qi, t = (pl.program_id(a) for a in range(4))
  slot = lists.slot(b, h, qi, t)

  @pl.when(t == 0)
  def _():
    m_scr[...] = jnp.full_like(m_scr, reference.MASK_VALUE)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  def body(masked):
    s, _ = reference.logits(cfg, q_ref[...], k_ref[...])
    valid = _valid(cfg, qi, idx_ref[slot], h, extra) if masked else None
    m, l, acc = reference.online_softmax_step((m_scr[...], l_scr[...], acc_scr[...]), s,
                                              v_ref[...], valid)
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

  _dispatch(kind_ref[slot], body)

  @pl.when(t == lists.length - 1)
  def _():
    o, lse = reference.finalize(m_scr[...], l_scr[...], acc_scr[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _query_grid_specs(cfg, lists, d: int):
  """On a (B, Hq, query block, list slot) grid over ``lists``: the kv block index
  map and the BlockSpecs of a q-shaped input, of K / V (GQA: head h reads kv
  head h // rep) and of a per-row statistic [B, Hq, Tp, 1]."""
  bq, bk, rep = cfg.block_q, cfg.block_kv, cfg.rep
  kv_block = lambda b_, h, qi, t, idx, kind: idx[lists.slot(b_, h, qi, t)]
  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, qi, t, idx, kind: (b_, h, qi, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, qi, t, idx, kind: (
      b_, jax.lax.div(h, rep), kv_block(b_, h, qi, t, idx, kind), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h, qi, t, idx, kind: (b_, h, qi, 0))
  return kv_block, q_spec, kv_spec, row_spec


def forward(cfg, q, k, v, q_seg, kv_seg, leaves, layout):
  """``(o [B, Tp, Hq, D], lse [B, Hq, Tp])`` over the listed kv blocks."""
  b, tp, hq, d = q.shape
  bq = cfg.block_q
  lists = _Lists(layout)
  kv_block, q_spec, kv_spec, lse_spec = _query_grid_specs(cfg, lists, d)
  extra_specs = _extra_specs(cfg, q_seg, leaves, lambda b_, h, qi, *_: qi, kv_block,
                             lambda b_, h, *_: h)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, hq, tp // bq, lists.length),
      in_specs=[q_spec, kv_spec, kv_spec, *extra_specs],
      out_specs=[q_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, lists=lists), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp, 1), jnp.float32)],
      compiler_params=_SEMANTICS, interpret=cfg.interpret,
  )(lists.index, lists.kind, _bhtd(q), _bhtd(k), _bhtd(v), *_inputs(cfg, q_seg, kv_seg, leaves))
  return _bhtd(o), lse[..., 0]


# --------------------------------------------------------------------------
# Backward: dq over the forward lists, dk/dv over the transposed lists


def _dq_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg, lists):
  *extra, dq_ref, dq_scr = refs
  b, h, qi, t = (pl.program_id(a) for a in range(4))
  slot = lists.slot(b, h, qi, t)

  @pl.when(t == 0)
  def _():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  def body(masked):
    valid = _valid(cfg, qi, idx_ref[slot], h, extra) if masked else None
    k = k_ref[...]
    _, ds = reference.probs_and_dlogits(cfg, q_ref[...], k, v_ref[...], do_ref[...],
                                        lse_ref[...], delta_ref[...], valid)
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _dispatch(kind_ref[slot], body)

  @pl.when(t == lists.length - 1)
  def _():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg, lists):
  *extra, dk_ref, dv_ref, dk_scr, dv_scr = refs
  b, g, kj, u = (pl.program_id(a) for a in range(4))
  h = g * cfg.rep + jax.lax.div(u, lists.length)
  slot = lists.slot(b, h, kj, jax.lax.rem(u, lists.length))

  @pl.when(u == 0)
  def _():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  def body(masked):
    valid = _valid(cfg, idx_ref[slot], kj, h, extra) if masked else None
    q, do = q_ref[...], do_ref[...]
    p, ds = reference.probs_and_dlogits(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...],
                                        delta_ref[...], valid)
    tn = (((0,), (0,)), ((), ()))   # contract the query rows: p^T do, ds^T q
    dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                       preferred_element_type=jnp.float32)
    dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                       preferred_element_type=jnp.float32)

  _dispatch(kind_ref[slot], body)

  @pl.when(u == cfg.rep * lists.length - 1)
  def _():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(cfg, q, k, v, q_seg, kv_seg, leaves, layout, layout_t, o, lse, do):
  """``(dq, dk, dv)`` in the op's layout."""
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  bq, bk, rep = cfg.block_q, cfg.block_kv, cfg.rep
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)      # [B, Tp, Hq]
  qt, kt, vt, dot_ = _bhtd(q), _bhtd(k), _bhtd(v), _bhtd(do)
  stats = (lse[..., None], delta.transpose(0, 2, 1)[..., None])              # [B, Hq, Tp, 1]
  extra = _inputs(cfg, q_seg, kv_seg, leaves)

  # dq: grid (B, Hq, nq, L) over the forward lists.
  fl = _Lists(layout)
  kv_block, q_spec, kv_spec, st_spec = _query_grid_specs(cfg, fl, d)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, lists=fl),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hq, tp // bq, fl.length),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec,
                    *_extra_specs(cfg, q_seg, leaves, lambda b_, h, qi, *_: qi, kv_block,
                                  lambda b_, h, *_: h)],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype),
      compiler_params=_SEMANTICS, interpret=cfg.interpret,
  )(fl.index, fl.kind, qt, kt, vt, dot_, *stats, *extra)

  # dk, dv: grid (B, Hkv, nk, rep * Lt); step u visits query head g*rep + u // Lt.
  tl = _Lists(layout_t)
  head = lambda b_, g, kj, u, idx, kind: g * rep + jax.lax.div(u, tl.length)
  q_block = lambda b_, g, kj, u, idx, kind: idx[tl.slot(b_, head(b_, g, kj, u, idx, kind), kj,
                                                        jax.lax.rem(u, tl.length))]
  qh_spec = pl.BlockSpec((None, None, bq, d), lambda *a: (a[0], head(*a), q_block(*a), 0))
  sth_spec = pl.BlockSpec((None, None, bq, 1), lambda *a: (a[0], head(*a), q_block(*a), 0))
  own_spec = pl.BlockSpec((None, None, bk, d), lambda b_, g, kj, u, idx, kind: (b_, g, kj, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, lists=tl),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, hkv, sp // bk, rep * tl.length),
          in_specs=[qh_spec, own_spec, own_spec, qh_spec, sth_spec, sth_spec,
                    *_extra_specs(cfg, q_seg, leaves, q_block,
                                  lambda b_, g, kj, *_: kj, head)],
          out_specs=[own_spec, own_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, sp, d), k.dtype),
                 jax.ShapeDtypeStruct((b, hkv, sp, d), v.dtype)],
      compiler_params=_SEMANTICS, interpret=cfg.interpret,
  )(tl.index, tl.kind, qt, kt, vt, dot_, *stats, *extra)
  return _bhtd(dq), _bhtd(dk), _bhtd(dv)
