"""Pure-jnp attention: the dense specification and the block-sparse XLA path.

Math (per batch ``b``, query head ``h`` with kv head ``g = h // (Hq / Hkv)``)::

  x_ij = scale * <q_i, k_j>              scale defaults to 1 / sqrt(D)
  s_ij = c * tanh(x_ij / c)              only with softcap = c (Gemma 2)
  p_ij = exp(s_ij - lse_i) on allowed pairs (mask, segments, j < S), else 0
  lse_i = log sum_{allowed j} exp(s_ij)
  o_i  = sum_j p_ij v_j

A query row with no allowed key has ``o_i = 0`` and ``lse_i = -inf`` (and
zero gradients): defined output, never NaN.

``attention_reference`` evaluates this densely (float64 when given float64
inputs under ``jax.enable_x64``): the specification for the tests.
``xla_forward``/``xla_backward`` are the XLA path of ``block_sparse_attention``:
they visit only the kv blocks a ``BlockLayout`` lists, by gathering them
(``[.., nq, bk, D]`` per list slot) and running FlashAttention-2's online
softmax (Dao, 2023) in a ``lax.scan`` over the slots with float32 statistics,
so the dense ``T x S`` score matrix is never formed; work and memory are
O(T * max_blocks * bk) instead of O(T * S).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention import masks as masks_lib

# Finite "minus infinity" for running maxima (as jax's flash attention).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static description of one block-sparse attention call (hashable).

  Arrays reach the implementations padded: q ``[B, Tp, Hq, D]``, k/v
  ``[B, Sp, Hkv, D]`` with ``Tp``/``Sp`` multiples of the block sizes;
  ``seq_q``/``seq_kv`` are the real lengths.
  """
  mask_tree: Any          # treedef of the mask; its leaves travel as arrays
  scale: float
  softcap: float | None
  block_q: int
  block_kv: int
  seq_q: int
  seq_kv: int
  num_heads: int
  num_kv_heads: int
  interpret: Any = None

  @property
  def rep(self) -> int:
    return self.num_heads // self.num_kv_heads

  def mask(self, leaves) -> masks_lib.Mask:
    return jax.tree_util.tree_unflatten(self.mask_tree, leaves)


def logits(cfg: Config, q, k):
  """``(s, dtanh)``: capped scores in float32 and ``ds/dx`` (None without softcap).

  ``q [..., bq, D]``, ``k [..., bk, D]`` -> ``[..., bq, bk]``.
  """
  x = jnp.einsum("...id,...jd->...ij", q, k, preferred_element_type=jnp.float32)
  return apply_softcap(x * cfg.scale, cfg.softcap)


def apply_softcap(x, cap):
  """``(cap * tanh(x / cap), 1 - tanh^2)``, or ``(x, None)`` without a cap."""
  if cap is None:
    return x, None
  t = jnp.tanh(x / cap)
  return cap * t, 1.0 - t * t


def online_softmax_step(carry, s, v, valid=None):
  """One FlashAttention-2 update of ``(m, l, acc)`` with scores ``s [.., bq, bk]``.

  ``m``, ``l`` are ``[.., bq, 1]`` float32 running max and sum, ``acc``
  ``[.., bq, D]`` float32; ``valid`` (None: all) masks scores. Used by the
  XLA path and both kernels.
  """
  m, l, acc = carry
  s_max = s if valid is None else jnp.where(valid, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s_max, axis=-1, keepdims=True))
  p = jnp.exp(s - m_new)
  if valid is not None:
    p = jnp.where(valid, p, 0.0)
  alpha = jnp.exp(m - m_new)
  pv = jnp.einsum("...ij,...jd->...id", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv


def probs_and_dlogits(cfg: "Config", q, k, v, do, lse, delta, valid=None):
  """Backward tile: ``(p, dx)`` with ``dx = d loss / d (q.k)`` (scale and softcap applied).

  ``p = exp(s - lse)`` on valid pairs, ``dp = do v^T``,
  ``ds = p (dp - delta)`` with ``delta = rowsum(do * o)``; then the softcap
  and scale chain rule.
  """
  s, dtanh = logits(cfg, q, k)
  p = jnp.exp(s - lse)
  if valid is not None:
    p = jnp.where(valid, p, 0.0)
  dp = jnp.einsum("...id,...jd->...ij", do, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  if dtanh is not None:
    ds = ds * dtanh
  return p, ds * cfg.scale


def finalize(m, l, acc):
  """``(o, lse)`` from online-softmax state; empty rows give ``(0, -inf)``."""
  nonempty = l > 0
  o = acc / jnp.where(nonempty, l, 1.0)
  lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
  return o, lse


def merge_partials(o, lse, axis: int):
  """Merges partial attentions along ``axis`` (flash-decoding's LSE merge).

  ``o [..., n, ..., D]`` and ``lse [..., n, ...]`` (float32, ``-inf`` for an
  empty part) -> ``(o, lse)`` with ``axis`` reduced; all-empty gives (0, -inf).
  """
  m = jnp.max(lse, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m)
  l = jnp.sum(w, axis=axis)
  o = jnp.sum(o * w[..., None], axis=axis) / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, jnp.squeeze(m, axis) + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return o, lse


# --------------------------------------------------------------------------
# Dense specification


def attention_reference(q, k, v, mask=None, *, segment_ids=None, scale=None, softcap=None,
                        return_lse: bool = False):
  """Dense attention with the equivalent dense mask (the specification).

  Computes in ``promote(q.dtype, float32)``: float64 for float64 inputs under
  ``jax.enable_x64``. Differentiable with ``jax.grad``.

  Args:
    q: ``[B, T, Hq, D]``.  k, v: ``[B, S, Hkv, D]``.
    mask: an ``ops.attention`` mask (None: ``FullMask``).
    segment_ids: None or ``(q_segment_ids [B, T], kv_segment_ids [B, S])``.
    scale, softcap: as ``block_sparse_attention``.
    return_lse: also return ``lse [B, Hq, T]``.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  k, v = (jnp.repeat(x, hq // hkv, axis=2) for x in (k, v))
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  x = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  if softcap is not None:
    x = softcap * jnp.tanh(x / softcap)
  mask = masks_lib.FullMask() if mask is None else mask
  i, j = jnp.arange(t)[None, :, None], jnp.arange(s)[None, None, :]
  h = jnp.arange(hq)[:, None, None]
  lookup = lambda a: jnp.asarray(a)[h % a.shape[0], i, j]
  valid = jnp.broadcast_to(mask.element(i, j, h, hq, lookup), (hq, t, s))[None]
  if segment_ids is not None:
    qs, ks = segment_ids
    valid = valid & (qs[:, None, :, None] == ks[:, None, None, :])
  m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, x, -jnp.inf), -1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(jnp.where(valid, x, m) - m), 0.0)
  l = p.sum(-1, keepdims=True)
  o = jnp.einsum("bhts,bshd->bthd", p / jnp.where(l > 0, l, 1.0), v)
  if not return_lse:
    return o
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
  return o, lse


# --------------------------------------------------------------------------
# XLA path: gather the listed kv blocks, online softmax over list slots


# Bytes of one scan step's float32 scores (a chunk of query blocks against one
# kv block). Chunking the queries keeps the working set cache-sized, so the
# XLA path's time grows linearly in T instead of with cache misses.
_CHUNK_BYTES = 4 << 20


class _Blocked:
  """Blocked, query-chunked views and per-slot gathers for the XLA path.

  Queries are grouped by kv head, ``[B, G, R, nq, bq, D]`` with ``G = Hkv``
  and ``R = Hq / Hkv``, and the ``nq`` query blocks are split into ``n``
  chunks of ``c`` (padded with blocks whose lists are empty); an outer
  ``lax.scan`` walks the chunks, an inner one the list slots. The layout's
  head dim (1 or Hq) becomes ``[G', R']``.
  """

  def __init__(self, cfg: Config, q, k, kv_seg, leaves):
    self.cfg = cfg
    b, tp, hq, d = q.shape
    self.g, self.r = cfg.num_kv_heads, cfg.rep
    self.nq, self.nk = tp // cfg.block_q, k.shape[1] // cfg.block_kv
    rows = _CHUNK_BYTES // (4 * b * hq * cfg.block_kv)
    self.c = min(self.nq, max(1, rows // cfg.block_q))
    self.n = -(-self.nq // self.c)
    self.mask = cfg.mask(leaves)
    self.kv_seg = kv_seg
    self.head = (jnp.arange(self.g)[:, None] * self.r
                 + jnp.arange(self.r))[:, :, None, None, None]              # [G, R, 1, 1, 1]
    self.bidx = jnp.arange(b)[:, None, None, None]
    self.gidx = jnp.arange(self.g)[None, :, None, None]

  def _chunk(self, x, axis: int):
    """Splits the query-block axis (size nq) into chunks: ``[n, ..., c, ...]``."""
    x = jnp.pad(x, [(0, self.n * self.c - self.nq if a == axis else 0) for a in range(x.ndim)])
    x = x.reshape(x.shape[:axis] + (self.n, self.c) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  def _unchunk(self, x, axis: int):
    """Inverse of ``_chunk`` (``axis`` counted without the leading chunk axis)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (self.n * self.c,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, self.nq, axis=axis)

  def q_chunks(self, x):      # [B, Tp, Hq, X] -> [n, B, G, R, c, bq, X]
    b, x_dim = x.shape[0], x.shape[-1]
    x = x.reshape(b, self.nq, self.cfg.block_q, self.g, self.r, x_dim)
    return self._chunk(x.transpose(0, 3, 4, 1, 2, 5), 3)

  def from_q_chunks(self, x):  # inverse of q_chunks
    x = self._unchunk(x, 3)
    b, x_dim = x.shape[0], x.shape[-1]
    return x.transpose(0, 3, 4, 1, 2, 5).reshape(b, -1, self.g * self.r, x_dim)

  def chunk_context(self, q_seg, layout):
    """Per-chunk scan inputs: list indices/kinds, query positions and segments."""
    def heads(x):   # [B', H', nq, L] -> [n, B', G', R', c, L]; H' = Hq, Hkv or 1
      per_head = x.shape[1] == self.g * self.r
      x = x.reshape(x.shape[0], self.g, self.r, *x.shape[2:]) if per_head else x[:, :, None]
      return self._chunk(x, 3)
    i = jnp.arange(self.nq * self.cfg.block_q).reshape(self.nq, self.cfg.block_q, 1)
    seg = None
    if q_seg is not None:
      seg = self._chunk(q_seg.reshape(q_seg.shape[0], self.nq, 1, 1, self.cfg.block_q, 1), 1)
      seg = jnp.moveaxis(seg, 2, 4)          # [n, B, 1, 1, c, bq, 1]
    return heads(layout.index), heads(layout.kind), self._chunk(i, 0), seg

  def to_blocks_kv(self, x):   # [B, Sp, Hkv, D] -> [B, G, nk, bk, D]
    b = x.shape[0]
    return x.reshape(b, self.nk, self.cfg.block_kv, x.shape[2], x.shape[3]).transpose(0, 3, 1, 2, 4)

  def gather(self, x, idx):    # x [B, G, nk, bk, D], idx [B', G', R', c] -> [B, G, R', c, bk, D]
    return x[self.bidx, self.gidx, idx]

  def valid(self, i, q_seg, idx, kind):
    """Allowed pairs of list slot ``idx``/``kind`` [B', G', R', c]: [.., c, bq, bk].

    ``i`` [c, bq, 1] are the chunk's query positions, ``q_seg`` its segment
    ids [B, 1, 1, c, bq, 1] (or None).
    """
    cfg = self.cfg
    j = (idx[..., None] * cfg.block_kv + jnp.arange(cfg.block_kv))[..., None, :]
    lookup = lambda a: a[self.head % a.shape[0], i, j]
    kv_seg = None
    if q_seg is not None:
      kv_seg = self.kv_seg[jnp.arange(self.kv_seg.shape[0])[:, None, None, None, None, None], j]
    valid = masks_lib.valid_pairs(self.mask, i, j, self.head, cfg.num_heads, cfg.seq_kv, lookup,
                                  q_seg, kv_seg)
    return valid & (kind > 0)[..., None, None]


def xla_forward(cfg: Config, q, k, v, q_seg, kv_seg, leaves, layout):
  """Block-sparse forward over the listed kv blocks: ``(o [B,Tp,Hq,D], lse [B,Hq,Tp])``."""
  blk = _Blocked(cfg, q, k, kv_seg, leaves)
  kb, vb = blk.to_blocks_kv(k), blk.to_blocks_kv(v)

  def chunk(_, xs):
    qb, (index, kind, i, seg) = xs

    def step(carry, t):
      idx = index[..., t]
      s, _ = logits(cfg, qb, blk.gather(kb, idx))
      return online_softmax_step(carry, s, blk.gather(vb, idx),
                                 blk.valid(i, seg, idx, kind[..., t])), None

    stats = jnp.zeros(qb.shape[:-1] + (1,), jnp.float32)
    init = (stats + MASK_VALUE, stats, jnp.zeros(qb.shape, jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(layout.max_blocks))
    o, lse = finalize(m, l, acc)
    return None, (o.astype(q.dtype), lse)

  _, (o, lse) = jax.lax.scan(chunk, None, (blk.q_chunks(q), blk.chunk_context(q_seg, layout)))
  return blk.from_q_chunks(o), blk.from_q_chunks(lse)[..., 0].transpose(0, 2, 1)


def xla_backward(cfg: Config, q, k, v, q_seg, kv_seg, leaves, layout, o, lse, do):
  """FlashAttention-2 backward over the same listed blocks: ``(dq, dk, dv)``.

  dk/dv are scatter-added into their kv block per slot, so the transposed
  layout is not needed.
  """
  blk = _Blocked(cfg, q, k, kv_seg, leaves)
  kb, vb = blk.to_blocks_kv(k), blk.to_blocks_kv(v)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
  rows = tuple(blk.q_chunks(x) for x in (q, do, lse.transpose(0, 2, 1)[..., None], delta))
  # Lists per query head: scatter per head; shared by a group (or all): sum first.
  r_sum = "r" if layout.index.shape[1] == cfg.num_heads and cfg.rep > 1 else ""

  def chunk(carry, xs):
    (qb, dob, lse_b, delta_b), (index, kind, i, seg) = xs

    def step(carry, t):
      dq, dk, dv = carry
      idx = index[..., t]
      kt, vt = blk.gather(kb, idx), blk.gather(vb, idx)
      p, ds = probs_and_dlogits(cfg, qb, kt, vt, dob, lse_b, delta_b,
                                blk.valid(i, seg, idx, kind[..., t]))
      dq = dq + jnp.einsum("...ij,...jd->...id", ds.astype(k.dtype), kt,
                           preferred_element_type=jnp.float32)
      spec = f"bgrqij,bgrqid->bg{r_sum}qjd"
      dk_t = jnp.einsum(spec, ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
      dv_t = jnp.einsum(spec, p.astype(do.dtype), dob, preferred_element_type=jnp.float32)
      if not r_sum:
        dk_t, dv_t = dk_t[:, :, None], dv_t[:, :, None]
      ii = (blk.bidx, blk.gidx, jnp.broadcast_to(idx, dk_t.shape[:4]))
      return (dq, dk.at[ii].add(dk_t), dv.at[ii].add(dv_t)), None

    (dq, dk, dv), _ = jax.lax.scan(step, (jnp.zeros(qb.shape, jnp.float32), *carry),
                                   jnp.arange(layout.max_blocks))
    return (dk, dv), dq.astype(q.dtype)

  zeros = jnp.zeros(kb.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(chunk, (zeros, zeros), (rows, blk.chunk_context(q_seg, layout)))

  def kv_out(x, like):
    return x.transpose(0, 2, 3, 1, 4).reshape(like.shape).astype(like.dtype)
  return blk.from_q_chunks(dq), kv_out(dk, k), kv_out(dv, v)


# --------------------------------------------------------------------------
# Dynamic block selection (top-k blocks, Quest pages) and the XLA decode path


def topk_block_kinds(q, k, mask, *, top_k: int, block_q: int, block_kv: int,
                     local_blocks: int, sink_blocks: int, segment_ids=None, token_scores=None):
  """Kinds ``[B, Hq or Hkv, nq, nk]`` of the blocks ``topk_block_attention`` visits.

  Block score ``<mean q of the query block, mean k of the kv block>`` per
  query head (padding rows excluded from the means), or with
  ``token_scores`` ``[B, Hq or Hkv, T, nk]`` the sum of the query block's
  rows of it (kinds then per kv head); kept: the first
  ``sink_blocks`` kv blocks, the ``local_blocks`` kv blocks ending at the one
  holding the query block's last position, and the ``top_k`` best-scoring
  other blocks, all among the blocks ``mask`` (and ``segment_ids``, a
  ``(q_seg, kv_seg)`` pair) allows. Returns ``(kinds, bounds)`` as
  ``masks.block_kinds``.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  base, _ = masks_lib.block_kinds(mask, t, s, block_q, block_kv, hq)      # NumPy [1,1,nq,nk]
  nq, nk = base.shape[-2:]
  per_q, per_kv = masks_lib.list_bounds(base)
  if segment_ids is not None:
    base = jnp.minimum(base, masks_lib.segment_kinds(*segment_ids, block_q, block_kv)[:, None])

  def pooled(x, n, block, length):
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    x = jnp.pad(x, ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
    rows = np.minimum(block, length - np.arange(n) * block).astype(np.float32)
    return x.reshape(b, n, block, x.shape[2], d).sum(2) / rows[None, :, None, None]
  if token_scores is None:
    qbar = pooled(q, nq, block_q, t).reshape(b, nq, hkv, hq // hkv, d)
    kbar = pooled(k, nk, block_kv, s)
    score = jnp.einsum("bqgrd,bkgd->bgrqk", qbar, kbar).reshape(b, hq, nq, nk)
  else:
    score = jax.lax.stop_gradient(token_scores).astype(jnp.float32)
    score = jnp.pad(score, ((0, 0), (0, 0), (0, nq * block_q - t), (0, 0)))
    score = score.reshape(b, score.shape[1], nq, block_q, nk).sum(3)
  eligible = base > 0
  kb = np.arange(nk)[None, :]
  kb_last = np.minimum((np.minimum(np.arange(1, nq + 1) * block_q, t) - 1) // block_kv,
                       nk - 1)[:, None]
  forced = ((kb < sink_blocks) | ((kb <= kb_last) & (kb > kb_last - local_blocks))) & eligible
  selected = jnp.asarray(forced)
  if top_k > 0:
    cand = jnp.where(eligible & ~forced, score, -jnp.inf)
    vals, ids = jax.lax.top_k(cand, min(top_k, nk))
    picked = (ids[..., None] == jnp.arange(nk)) & (vals > -jnp.inf)[..., None]
    selected = selected | picked.any(-2)
  kinds = jnp.where(selected, base, 0).astype(jnp.int8)
  return kinds, (min(top_k + local_blocks + sink_blocks, per_q), per_kv)


def decode_block_kinds(q, k_cache, lengths, top_k_blocks, block_kv: int):
  """Kinds ``[B, 1 or Hkv, 1, nk]`` of the cache blocks a decode step visits.

  FULL for blocks inside ``lengths``, PARTIAL for the block it ends in,
  EMPTY beyond; with ``top_k_blocks`` only the blocks of each kv head with
  the largest Quest bound for the query ``q [B, Hq, D]`` remain.
  """
  s = k_cache.shape[1]
  nk = -(-s // block_kv)
  lo = jnp.arange(nk) * block_kv
  nonempty = lo[None] < lengths[:, None]
  kinds = jnp.where(lo[None] + block_kv <= lengths[:, None], masks_lib.FULL,
                    jnp.where(nonempty, masks_lib.PARTIAL, masks_lib.EMPTY))
  kinds = kinds.astype(jnp.int8)[:, None, None, :]
  if top_k_blocks is None:
    return kinds
  kmin, kmax = key_block_bounds(k_cache, block_kv, lengths)
  upper = jnp.where(nonempty[:, None], quest_bound(q[:, None], kmin, kmax)[:, :, 0], -jnp.inf)
  vals, ids = jax.lax.top_k(upper, min(top_k_blocks, nk))
  picked = ((ids[..., None] == jnp.arange(nk)) & (vals > -jnp.inf)[..., None]).any(-2)
  return jnp.where(picked[:, :, None, :], kinds, masks_lib.EMPTY).astype(jnp.int8)


def key_block_bounds(k, block_kv: int, lengths=None):
  """Quest's page metadata: elementwise ``(min, max)`` of each kv block's keys.

  ``k [B, S, Hkv, D]`` -> two ``[B, nk, Hkv, D]`` float32 (no gradient), with
  ``nk = ceil(S / block_kv)``; keys at or past ``lengths [B]`` (default S)
  are left out, and an empty block gives zeros.
  """
  b, s, hkv, d = k.shape
  nk = -(-s // block_kv)
  kp = jnp.pad(jax.lax.stop_gradient(k).astype(jnp.float32),
               ((0, 0), (0, nk * block_kv - s), (0, 0), (0, 0))).reshape(b, nk, block_kv, hkv, d)
  end = jnp.full((b,), s) if lengths is None else jnp.minimum(lengths, s)
  valid = (jnp.arange(nk * block_kv).reshape(nk, block_kv)[None] < end[:, None, None])
  valid = valid[..., None, None]
  nonempty = valid.any(2)
  kmin = jnp.where(nonempty, jnp.where(valid, kp, jnp.inf).min(2), 0.0)
  kmax = jnp.where(nonempty, jnp.where(valid, kp, -jnp.inf).max(2), 0.0)
  return kmin, kmax


def quest_bound(q, kmin, kmax):
  """Quest's upper bound of ``<q_i, k_j>`` over each block (Tang et al. 2024),
  summed over the query heads of a GQA group::

    u[g, i, c] = sum_{h in g} sum_d max(q_hd kmin_cd, q_hd kmax_cd)
               = sum_{h in g} relu(q_h) . kmax_c - relu(-q_h) . kmin_c

  ``q [B, T, Hq, D]``, ``kmin``/``kmax`` ``[B, nk, Hkv, D]`` -> ``[B, Hkv, T, nk]``
  float32, no gradient. ``u >= sum_{h in g} max_{j in c} <q_h, k_j>``.
  """
  b, t, hq, d = q.shape
  hkv = kmin.shape[2]
  qg = jax.lax.stop_gradient(q).astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  return (jnp.einsum("btgrd,bcgd->bgtc", jax.nn.relu(qg), kmax)
          - jnp.einsum("btgrd,bcgd->bgtc", jax.nn.relu(-qg), kmin))


def xla_decode(qg, k_cache, v_cache, lengths, layout, block_kv: int, scale: float, softcap):
  """Flash-decoding in XLA: one partial ``(o, lse)`` per cache block, LSE-merged.

  ``qg [B, R, Hkv, D]`` (query heads grouped by kv head), padded caches
  ``[B, nk * bk, Hkv, D]``; ``layout`` ``[B, 1 or Hkv, 1, L]`` lists the
  blocks to visit (gathered), None visits every block in place.
  Returns ``[B, R, Hkv, D]`` float32.
  """
  b, sp, hkv, d = k_cache.shape
  nk = sp // block_kv
  kt, vt = (x.reshape(b, nk, block_kv, hkv, d).transpose(0, 3, 1, 2, 4)   # [B, G, nk, bk, D]
            for x in (k_cache, v_cache))
  if layout is None:
    idx, listed = jnp.arange(nk)[None, None], True
  else:
    idx, kind = layout.index[:, :, 0], layout.kind[:, :, 0]             # [B, H', L]
    ii = (jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None], idx)
    kt, vt, listed = kt[ii], vt[ii], (kind > 0)[..., None]              # [B, G, L, bk, D]
  s = jnp.einsum("brgd,bgljd->bgrlj", qg, kt, preferred_element_type=jnp.float32) * scale
  s, _ = apply_softcap(s, softcap)
  j = idx[..., None] * block_kv + jnp.arange(block_kv)
  valid = ((j < lengths[:, None, None, None]) & listed)[:, :, None]
  m = jnp.max(jnp.where(valid, s, MASK_VALUE), -1)
  p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
  o = jnp.einsum("bgrlj,bgljd->bgrld", p.astype(v_cache.dtype), vt,
                 preferred_element_type=jnp.float32)
  o, lse = finalize(m[..., None], p.sum(-1)[..., None], o)
  o, _ = merge_partials(o, lse[..., 0], axis=3)                       # [B, G, R, D]
  return o.transpose(0, 2, 1, 3)
