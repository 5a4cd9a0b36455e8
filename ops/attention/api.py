"""Public attention ops: validation, ``impl`` dispatch, ``custom_vjp``, block sizes.

Every implementation receives padded inputs (T and S rounded up to the block
sizes; padded keys are masked, padded query rows sliced off) and a
``BlockLayout``; ``"xla"`` gathers the listed kv blocks (``reference.py``),
``"pallas_tpu"`` and ``"pallas_gpu"`` scalar-prefetch / load them
(``tpu.py``, ``gpu.py``). All share one ``custom_vjp``: the forward saves
``(o, lse)`` and the backward recomputes the probabilities blockwise
(FlashAttention-2, Dao 2023).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ops import common
from ops import config as ops_config
from ops.attention import gpu
from ops.attention import masks as masks_lib
from ops.attention import reference
from ops.attention import tpu

_FORWARD = {"xla": reference.xla_forward, "pallas_tpu": tpu.forward, "pallas_gpu": gpu.forward}
# The kernels' backward also takes the transposed layout; XLA scatter-adds dk/dv.
_BACKWARD = {"pallas_tpu": tpu.backward, "pallas_gpu": gpu.backward}
# device_kind -> predicate; both tables are empty (no accelerator measurements).
_MEASURED = {**tpu.MEASURED_FASTER, **gpu.MEASURED_FASTER}
_TARGET = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


# --------------------------------------------------------------------------
# Block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and kv block sizes of the block-sparse layout and kernels.

  Hardware rules: ``pallas_tpu`` needs ``block_q % 8 == 0`` and
  ``block_kv % 128 == 0`` (the (8, 128) tile); ``pallas_gpu`` (Triton) needs
  powers of two >= 16. ``"xla"`` takes any positive sizes. Blocks larger
  than the (rounded-up) sequence are shrunk by ``fit``.
  """
  block_q: int = 128
  block_kv: int = 128

  # device_kind -> (block_q, block_kv) tuned for that device. Empty: no
  # accelerator measurements exist yet (see benchmarks/README.md).
  TUNED: ClassVar[dict] = {}

  @classmethod
  def get_default(cls, shape, dtype, device_kind: str | None = None) -> "BlockSizes":
    """Tuned sizes for ``device_kind`` (``shape``/``dtype`` of q), else 128 x 128."""
    del shape, dtype
    return cls(*cls.TUNED.get(device_kind or common.device_kind(), (128, 128)))

  def validate(self, impl: str) -> None:
    for name in ("block_q", "block_kv"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if impl == "pallas_tpu" and (self.block_q % 8 or self.block_kv % 128):
      raise ValueError("impl='pallas_tpu' needs block_q % 8 == 0 and block_kv % 128 == 0 "
                       f"(TPU (8, 128) tiles), got block_q={self.block_q}, "
                       f"block_kv={self.block_kv}")
    if impl == "pallas_gpu" and not all(common.is_pow2(v) and v >= 16 for v in
                                        (self.block_q, self.block_kv)):
      raise ValueError("impl='pallas_gpu' needs block_q and block_kv to be powers of two "
                       f">= 16 (Triton), got block_q={self.block_q}, block_kv={self.block_kv}")

  def fit(self, seq_q: int, seq_kv: int, impl: str) -> "BlockSizes":
    """Shrinks blocks to the padded sequence lengths (keeping hardware rules)."""
    if impl == "pallas_tpu":
      return BlockSizes(min(self.block_q, common.round_up(seq_q, 8)),
                        min(self.block_kv, common.round_up(seq_kv, 128)))
    if impl == "pallas_gpu":
      return BlockSizes(min(self.block_q, max(16, common.next_pow2(seq_q))),
                        min(self.block_kv, max(16, common.next_pow2(seq_kv))))
    return BlockSizes(min(self.block_q, seq_q), min(self.block_kv, seq_kv))


# --------------------------------------------------------------------------
# The shared custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(cfg, impl, q, k, v, q_seg, kv_seg, leaves, layout, layout_t):
  return _FORWARD[impl](cfg, q, k, v, q_seg, kv_seg, leaves, layout)[0]


def _attention_fwd(cfg, impl, q, k, v, q_seg, kv_seg, leaves, layout, layout_t):
  o, lse = _FORWARD[impl](cfg, q, k, v, q_seg, kv_seg, leaves, layout)
  return o, (q, k, v, q_seg, kv_seg, leaves, layout, layout_t, o, lse)


def _attention_bwd(cfg, impl, res, do):
  q, k, v, q_seg, kv_seg, leaves, layout, layout_t, o, lse = res
  if impl == "xla":
    dq, dk, dv = reference.xla_backward(cfg, q, k, v, q_seg, kv_seg, leaves, layout, o, lse, do)
  else:
    dq, dk, dv = _BACKWARD[impl](cfg, q, k, v, q_seg, kv_seg, leaves, layout, layout_t,
                                 o, lse, do)
  return dq, dk, dv, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------
# Validation


def _check_qkv(op: str, q, k, v, q_rank: int = 4) -> None:
  layout = "[B, T, Hq, D]" if q_rank == 4 else "[B, Hq, D]"
  common.check_rank("q", q, q_rank, layout)
  common.check_rank("k", k, 4, "[B, S, Hkv, D]")
  common.check_rank("v", v, 4, "[B, S, Hkv, D]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    common.check_float(name, x)
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"{op}: k and v must have the same shape, got {k.shape} and {v.shape}")
  hq, d = q.shape[-2], q.shape[-1]
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"{op}: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
  if k.shape[3] != d:
    raise ValueError(f"{op}: head_dim of q ({d}) and k ({k.shape[3]}) differ")
  if hq % k.shape[2]:
    raise ValueError(f"{op}: kv heads (Hkv={k.shape[2]}) must divide query heads (Hq={hq})")
  if (q_rank == 4 and q.shape[1] < 1) or k.shape[1] < 1:
    raise ValueError(f"{op}: empty sequence: q {q.shape}, k {k.shape}")


def _check_scalars(scale, softcap) -> None:
  if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"scale must be a positive float or None, got {scale!r}")
  if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
    raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")


def _check_int(op: str, name: str, val, lo: int) -> None:
  if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
    raise ValueError(f"{op}: {name} must be an int >= {lo}, got {val!r}")


def _segments(segment_ids, b: int, t: int, s: int):
  """Normalises ``segment_ids`` to a ``(q_seg [B, T], kv_seg [B, S])`` int32 pair."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be [B, T] or a (q_segment_ids, kv_segment_ids) pair, "
                       f"got a sequence of {len(segment_ids)}")
    q_seg, kv_seg = segment_ids
  else:
    if t != s:
      raise ValueError(f"segment_ids: with T={t} != S={s} pass a (q_segment_ids [B, T], "
                       "kv_segment_ids [B, S]) pair")
    q_seg = kv_seg = segment_ids
  for name, x, n in (("q_segment_ids", q_seg, t), ("kv_segment_ids", kv_seg, s)):
    if not hasattr(x, "shape") or tuple(x.shape) != (b, n):
      raise ValueError(f"segment_ids: {name} must have shape [B, {'T' if n == t else 'S'}] = "
                       f"[{b}, {n}], got {getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"segment_ids: {name} must be integer, got {x.dtype}")
  return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def _supported(q) -> Any:
  def supported(kernel: str) -> bool:
    if kernel == "pallas_gpu":
      return q.shape[-1] <= 256
    return kernel == "pallas_tpu"
  return supported


def _resolve(op: str, impl: str, q, block_q, block_kv, seq_q, seq_kv):
  impl = common.select_impl(impl, op=op, supported=_supported(q), measured_faster=_MEASURED)
  if block_q is None or block_kv is None:
    default = BlockSizes.get_default(q.shape, q.dtype)
    block_q = default.block_q if block_q is None else block_q
    block_kv = default.block_kv if block_kv is None else block_kv
  sizes = BlockSizes(block_q, block_kv)
  sizes.validate(impl)
  return impl, sizes.fit(seq_q, seq_kv, impl)


# --------------------------------------------------------------------------
# Shared driver


def _run(impl, sizes, q, k, v, mask, segs, kinds, bounds, scale, softcap, interpret,
         forward_only=False):
  """Pads, builds layouts from ``kinds`` and calls the custom_vjp op.

  ``forward_only``: return the padded ``(o, lse)`` of the forward pass instead.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = sizes.block_q, sizes.block_kv
  tp, sp = common.round_up(t, bq), common.round_up(s, bk)
  leaves, tree = jax.tree_util.tree_flatten(mask)
  leaves = [jnp.pad(jnp.asarray(a), ((0, 0), (0, tp - t), (0, sp - s))) for a in leaves]
  cfg = reference.Config(
      mask_tree=tree, scale=float(1.0 / np.sqrt(d) if scale is None else scale),
      softcap=None if softcap is None else float(softcap), block_q=bq, block_kv=bk,
      seq_q=t, seq_kv=s, num_heads=hq, num_kv_heads=hkv,
      interpret=None if impl == "xla" else ops_config.resolve_interpret(interpret,
                                                                        _TARGET[impl]))
  if impl != "xla" and kinds.shape[1] not in (1, hq):   # kernels: one list per query head
    kinds = jnp.repeat(kinds, hq // kinds.shape[1], axis=1)
  layout = jax.tree_util.tree_map(jnp.asarray, masks_lib.block_layout(kinds, bounds[0]))
  layout_t = None
  if impl != "xla" and not forward_only:   # kernels' dk/dv: per kv block, its query blocks
    layout_t = jax.tree_util.tree_map(
        jnp.asarray, masks_lib.block_layout(kinds.swapaxes(-1, -2), bounds[1]))
  q_seg = kv_seg = None
  if segs is not None:
    q_seg = jnp.pad(segs[0], ((0, 0), (0, tp - t)), mode="edge")
    kv_seg = jnp.pad(segs[1], ((0, 0), (0, sp - s)), mode="edge")
  qp = common.pad_axis(q, 1, bq)
  kp, vp = common.pad_axis(k, 1, bk), common.pad_axis(v, 1, bk)
  if forward_only:
    return _FORWARD[impl](cfg, qp, kp, vp, q_seg, kv_seg, leaves, layout)
  o = _attention(cfg, impl, qp, kp, vp, q_seg, kv_seg, leaves, layout, layout_t)
  return o[:, :t]


# --------------------------------------------------------------------------
# Public ops


def block_sparse_attention(q, k, v, mask=None, *, segment_ids=None, scale=None, softcap=None,
                           block_q=128, block_kv=128, impl="auto", interpret=None):
  """Block-sparse flash attention: visits only the non-empty blocks of ``mask``.

  ``o_i = sum_j softmax_j(s_ij) v_j`` over allowed pairs ``(i, j)`` with
  ``s_ij = scale <q_i, k_j>`` (``softcap * tanh(. / softcap)`` when given).
  A query row with no allowed key gives ``o_i = 0`` (never NaN).

  Args:
    q: ``[B, T, Hq, D]``.
    k, v: ``[B, S, Hkv, D]``; ``Hkv`` divides ``Hq`` (GQA / MQA).
    mask: an ``ops.attention`` mask (``CausalMask() & LocalMask(1024)``, ...);
      None means ``FullMask()``. Positions count from 0 in both q and k.
    segment_ids: None, int ``[B, T]`` (needs ``S == T``) or a pair
      ``(q_segment_ids [B, T], kv_segment_ids [B, S])``; only equal ids
      attend (packed documents). Blocks across documents are skipped.
    scale: logit scale, default ``1 / sqrt(D)``.
    softcap: logit soft-capping ``c * tanh(x / c)`` (Gemma 2), default off.
    block_q, block_kv: block sizes (``BlockSizes``); None: ``get_default``.
    impl: ``"auto" | "xla" | "pallas_tpu" | "pallas_gpu"``.
    interpret: Pallas interpret mode (see ``ops.config``).

  Returns:
    ``[B, T, Hq, D]`` in q's dtype. Differentiable in q, k, v.
  """
  _check_qkv("block_sparse_attention", q, k, v)
  _check_scalars(scale, softcap)
  mask = masks_lib.FullMask() if mask is None else masks_lib.check_mask(mask)
  b, t, hq, _ = q.shape
  s = k.shape[1]
  segs = _segments(segment_ids, b, t, s)
  impl, sizes = _resolve("block_sparse_attention", impl, q, block_q, block_kv, t, s)
  kinds, bounds = masks_lib.block_kinds(mask, t, s, sizes.block_q, sizes.block_kv, hq, segs)
  return _run(impl, sizes, q, k, v, mask, segs, kinds, bounds, scale, softcap, interpret)


def topk_block_attention(q, k, v, *, top_k, block_size=64, query_block=None, local_blocks=1,
                         sink_blocks=1, causal=True, segment_ids=None, token_scores=None,
                         scale=None, softcap=None, impl="auto", interpret=None):
  """Attention over dynamically selected kv blocks (MoBA / NSA selection / Quest).

  Each query block of ``query_block`` rows scores every kv block by the
  block-mean query against the block-mean key (per query head, against its
  kv head), ``score[qb, kb] = <mean_i q_i, mean_j k_j> = mean_i <q_i, kbar_kb>``
  (MoBA's per-token gate ``<q_i, kbar>`` averaged over the block), or, with
  ``token_scores``, by ``sum_{i in qb} token_scores[i, kb]`` (e.g. NSA's
  compressed-attention probabilities, which a model trains, or Quest's
  bound from ``quest_scores``), and keeps the
  ``top_k`` best-scoring eligible blocks plus the ``sink_blocks`` first kv
  blocks and the ``local_blocks`` kv blocks ending at the one that holds the
  query block's last position; then runs block-sparse attention over them
  (with ``CausalMask`` inside and across blocks if ``causal``; eligible
  means not entirely in the future). The selection is not differentiated;
  gradients reach q, k and v through the attention. With ``top_k`` at least
  the number of kv blocks this is dense (causal) attention.

  Deviations: MoBA and NSA select per query token (NSA shares the choice
  across a GQA group); here the selection is per query block and query
  head (per kv head with ``[B, Hkv, ...]`` ``token_scores``), the
  granularity block-sparse kernels run at (Mixture of Block
  Attention, Lu et al. 2025; Native Sparse Attention, Yuan et al. 2025;
  Quest, Tang et al. 2024). A ``query_block`` smaller than ``block_size``
  moves towards per-token selection: the attention FLOPs stay
  ``T * (top_k + local + sink) * block_size``, the gathers grow as
  ``1 / query_block``.

  Args:
    q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]``.
    top_k: selected blocks per query block besides the sink and local ones.
    block_size: kv block size, the unit of selection (``pallas_tpu`` needs a
      multiple of 128; shrunk for short sequences like ``BlockSizes.fit``).
    query_block: rows sharing one selection (None: ``block_size``); the
      kernels' ``block_q`` rules apply.
    local_blocks, sink_blocks: always-kept blocks.
    causal: ``j <= i``.
    segment_ids: as ``block_sparse_attention``; blocks of other documents
      are not eligible (the block means may still span a boundary).
    token_scores: None or ``[B, H, T, ceil(S / block_size)]`` per query row
      and kv block, higher is better; not differentiated. ``H = Hq``: a
      selection per query head; ``H = Hkv``: one per kv head, shared by its
      GQA group as in NSA (fewer gathers on the XLA path). ``quest_scores``
      gives Quest's bound in this layout.
    scale, softcap, impl, interpret: as ``block_sparse_attention``.

  Returns:
    ``[B, T, Hq, D]`` in q's dtype.
  """
  _check_qkv("topk_block_attention", q, k, v)
  _check_scalars(scale, softcap)
  query_block = block_size if query_block is None else query_block
  for name, val, lo in (("top_k", top_k, 0), ("block_size", block_size, 1),
                        ("query_block", query_block, 1), ("local_blocks", local_blocks, 0),
                        ("sink_blocks", sink_blocks, 0)):
    _check_int("topk_block_attention", name, val, lo)
  if top_k + local_blocks + sink_blocks < 1:
    raise ValueError("topk_block_attention: top_k + local_blocks + sink_blocks must be >= 1, "
                     f"got {top_k} + {local_blocks} + {sink_blocks}")
  b, t, hq, _ = q.shape
  s = k.shape[1]
  nk = -(-s // block_size)   # kv blocks do not change when `fit` shrinks them
  if token_scores is not None and tuple(token_scores.shape) not in ((b, hq, t, nk),
                                                                    (b, k.shape[2], t, nk)):
    raise ValueError(f"topk_block_attention: token_scores must have shape [B, Hq or Hkv, T, "
                     f"ceil(S / block_size)] = [{b}, {hq} or {k.shape[2]}, {t}, {nk}], got "
                     f"{list(token_scores.shape)}")
  segs = _segments(segment_ids, b, t, s)
  if impl == "pallas_tpu" and (block_size % 128 or query_block % 8):
    # block_size is the unit of selection, so it cannot be padded to the TPU
    # (8, 128) tile without changing the result.
    raise ValueError("topk_block_attention: impl='pallas_tpu' needs block_size to be a multiple "
                     f"of 128 and query_block a multiple of 8 (TPU (8, 128) tiles), got "
                     f"block_size={block_size}, query_block={query_block}")
  impl, sizes = _resolve("topk_block_attention", impl, q, query_block, block_size, t, s)
  mask = masks_lib.CausalMask() if causal else masks_lib.FullMask()
  kinds, bounds = reference.topk_block_kinds(
      q, k, mask, top_k=top_k, block_q=sizes.block_q, block_kv=sizes.block_kv,
      local_blocks=local_blocks, sink_blocks=sink_blocks, segment_ids=segs,
      token_scores=token_scores)
  return _run(impl, sizes, q, k, v, mask, segs, kinds, bounds, scale, softcap, interpret)


def quest_scores(q, k, *, block_size=64):
  """Per-token block scores for ``topk_block_attention``: Quest's bound.

  ``u[b, g, i, c] = sum_{h in g} sum_d max(q_ihd kmin_cd, q_ihd kmax_cd)``
  with ``kmin_c``/``kmax_c`` the elementwise min/max of kv block ``c``'s keys:
  an upper bound of ``sum_{h in g} max_{j in c} <q_ih, k_j>`` (Tang et al.
  2024, "Quest"), summed over the query heads of each GQA group so a group
  shares its selection (as NSA). ``decode_attention(top_k_blocks=...)``
  ranks cache pages by the same bound, so a model that trains with these
  scores selects as it decodes. Deviation: Quest is an inference method
  that picks pages per decode query; ranking a query block's kv blocks by
  the sum of its rows' bounds, and training with that selection, is ours.

  Args:
    q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
    block_size: kv block size (as ``topk_block_attention``'s).

  Returns:
    ``[B, Hkv, T, ceil(S / block_size)]`` float32, not differentiated.
  """
  _check_qkv("quest_scores", q, k, k)
  _check_int("quest_scores", "block_size", block_size, 1)
  return reference.quest_bound(q, *reference.key_block_bounds(k, block_size))


def decode_attention(q, k_cache, v_cache, lengths, *, top_k_blocks=None, block_size=128,
                     num_splits=None, scale=None, softcap=None, impl="auto", interpret=None):
  """One query token per sequence against a KV cache (flash-decoding).

  ``o[b, h] = softmax_j(s_j) v_j`` over cache entries ``j < lengths[b]``
  (the query's own key must already be in the cache). The cache is split
  into blocks of ``block_size``; each block (``"xla"``) or each of
  ``num_splits`` chunks (kernels) yields a partial ``(o, lse)``, merged with
  a log-sum-exp (Dao et al., Flash-Decoding, 2023). ``lengths`` are
  clipped to ``[0, S]``; ``lengths[b] == 0`` gives zeros.

  With ``top_k_blocks``, Quest page selection (Tang et al., 2024): per block
  the elementwise min/max of its keys bounds ``q.k`` by
  ``sum_d max(q_d kmin_d, q_d kmax_d)``; the ``top_k_blocks`` blocks with the
  largest bound are attended. Deviation: the bound is summed over the query
  heads of a GQA group so the group shares its pages (as NSA); for MHA this
  is Quest.

  Args:
    q: ``[B, Hq, D]``; k_cache, v_cache: ``[B, S, Hkv, D]``; lengths: int ``[B]``.
    top_k_blocks: None (all blocks) or the number of blocks to keep.
    block_size: cache block (page) size.
    num_splits: kernel impls: chunks of the cache processed in parallel
      (default ``min(8, nk // 4)``, at least 1).
    scale, softcap, impl, interpret: as ``block_sparse_attention``.

  Returns:
    ``[B, Hq, D]`` in q's dtype. Differentiable only with ``impl="xla"``
    (plain jnp); the kernel impls are inference-only.
  """
  _check_qkv("decode_attention", q, k_cache, v_cache, q_rank=3)
  _check_scalars(scale, softcap)
  b, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  if not hasattr(lengths, "shape") or tuple(lengths.shape) != (b,) or not jnp.issubdtype(
      lengths.dtype, jnp.integer):
    raise ValueError(f"decode_attention: lengths must be an int array of shape [B] = [{b}], "
                     f"got {getattr(lengths, 'shape', type(lengths).__name__)} "
                     f"{getattr(lengths, 'dtype', '')}")
  if top_k_blocks is not None and (not isinstance(top_k_blocks, (int, np.integer))
                                   or isinstance(top_k_blocks, bool) or top_k_blocks < 1):
    raise ValueError(f"decode_attention: top_k_blocks must be None or an int >= 1, "
                     f"got {top_k_blocks!r}")
  if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
    raise ValueError(f"decode_attention: num_splits must be None or an int >= 1, "
                     f"got {num_splits!r}")
  rep = hq // hkv
  impl, sizes = _resolve("decode_attention", impl, q[:, None], 128, block_size, rep, s)
  bk = sizes.block_kv
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
  # Query heads of one kv group become the rows of one query block.
  qg = q.reshape(b, hkv, rep, d).transpose(0, 2, 1, 3)               # [B, R, Hkv, D]
  kinds = reference.decode_block_kinds(q, k_cache, lengths, top_k_blocks, bk)
  nk = kinds.shape[-1]
  bound = nk if top_k_blocks is None else min(top_k_blocks, nk)
  if impl == "xla":
    layout = None if top_k_blocks is None else masks_lib.block_layout(kinds, bound)
    o = reference.xla_decode(qg, common.pad_axis(k_cache, 1, bk), common.pad_axis(v_cache, 1, bk),
                             lengths, layout, bk, 1.0 / np.sqrt(d) if scale is None else scale,
                             softcap)
  else:
    n = num_splits or max(1, min(8, nk // 4))
    per = common.cdiv(nk, n)
    sp = n * per * bk
    kc, vc = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (k_cache, v_cache))
    kc, vc = (x.reshape(b * n, per * bk, hkv, d) for x in (kc, vc))
    kinds = jnp.pad(kinds, ((0, 0), (0, 0), (0, 0), (0, n * per - nk)))
    kinds = kinds.reshape(b, kinds.shape[1], 1, n, per).transpose(0, 3, 1, 2, 4)
    kinds = kinds.reshape(b * n, -1, 1, per)
    pos = jnp.arange(n * per * bk).reshape(n, per * bk)
    kv_seg = jnp.where(pos[None] < lengths[:, None, None], 0, 1).reshape(b * n, per * bk)
    qn = jnp.repeat(qg, n, axis=0)
    chunk_sizes = BlockSizes(sizes.block_q, bk).fit(rep, per * bk, impl)
    segs = (jnp.zeros((b * n, rep), jnp.int32), kv_seg)
    o, lse = _run(impl, chunk_sizes, qn, kc, vc, masks_lib.FullMask(), segs, kinds,
                  (min(bound, per), 1), scale, softcap, interpret, forward_only=True)
    o = o[:, :rep].astype(jnp.float32).reshape(b, n, rep, hkv, d)
    lse = lse[..., :rep].reshape(b, n, hkv, rep).transpose(0, 1, 3, 2)
    o, _ = reference.merge_partials(o, lse, axis=1)
  return o.transpose(0, 2, 1, 3).reshape(b, hq, d).astype(q.dtype)
