"""Attention masks and their block-level layout.

A mask is a predicate ``allowed(i, j, h)`` on query position ``i``, key
position ``j`` and query head ``h`` (positions count from 0 in q and in k;
for ``S != T`` both start at 0, as in ``jax.nn.dot_product_attention``).
Masks compose with ``&`` (both allow) and ``|`` (either allows)::

  mask = CausalMask() & (LocalMask(window=1024) | GlobalTokensMask(4))

For block sizes ``(bq, bk)`` a mask turns into *block kinds*: for every
query block ``qb`` and key block ``kb`` one of ``EMPTY`` (no pair allowed:
the block is never touched), ``FULL`` (every pair allowed: no per-element
masking) or ``PARTIAL`` (evaluate the predicate per element). The kinds are
computed by interval arithmetic on block bounds, so building them costs
O(nq * nk) vectorised NumPy (static masks) or jnp (traced data: segment ids,
``DenseMask`` of a traced array, top-k selections) and never loops over
elements. ``&`` takes the elementwise minimum of kinds and ``|`` the maximum
(``EMPTY < PARTIAL < FULL``); both are conservative, never wrong, since a
``PARTIAL`` block is always evaluated exactly.

``block_layout`` compacts kinds into per-query-block lists of kv blocks
(``BlockLayout``) that kernels scalar-prefetch; the same function applied to
the transposed kinds gives per-kv-block lists of query blocks (backward).

Masks are pytrees (``DenseMask``'s array is the only leaf), so they can be
passed through ``jax.jit``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2

# (array leaf) -> the mask values for the current (head, i, j) tile.
Lookup = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class BlockGrid:
  """Bounds of the query and key blocks the kinds are computed for.

  ``q_lo``/``q_hi`` are [1, nq, 1] (inclusive first/last real query position
  of each block), ``k_lo``/``k_hi`` [1, 1, nk]; ``head`` is [H, 1, 1].
  """
  q_lo: Any
  q_hi: Any
  k_lo: Any
  k_hi: Any
  head: Any
  num_heads: int
  block_q: int
  block_kv: int


class Mask(abc.ABC):
  """Base class. Subclasses define ``element`` and ``block_kinds``."""

  def __and__(self, other: "Mask") -> "Mask":
    return AndMask(self, check_mask(other))

  def __or__(self, other: "Mask") -> "Mask":
    return OrMask(self, check_mask(other))

  @abc.abstractmethod
  def element(self, i, j, head, num_heads: int, lookup: Lookup):
    """Bool array, the broadcast of ``i``, ``j`` (and ``head``): allowed pairs."""

  @abc.abstractmethod
  def block_kinds(self, grid: BlockGrid, xp):
    """int8 kinds broadcastable to [H, nq, nk] (``xp`` is numpy or jnp)."""

  def head_dependent(self) -> bool:
    return False

  def validate(self, seq_q: int, seq_kv: int, num_heads: int) -> None:
    """ValueError if the mask cannot apply to these sizes (the default: any sizes apply)."""
    del seq_q, seq_kv, num_heads

  def dense(self, seq_q: int, seq_kv: int, num_heads: int = 1) -> np.ndarray:
    """The equivalent dense bool mask, [num_heads, seq_q, seq_kv] (NumPy)."""
    self.validate(seq_q, seq_kv, num_heads)
    i = np.arange(seq_q)[None, :, None]
    j = np.arange(seq_kv)[None, None, :]
    h = np.arange(num_heads)[:, None, None]
    lookup = lambda a: np.asarray(a)[h % np.asarray(a).shape[0], i, j]
    out = self.element(i, j, h, num_heads, lookup)
    return np.broadcast_to(out, (num_heads, seq_q, seq_kv)).copy()


def check_mask(m) -> Mask:
  """``m`` if it is a mask, else ValueError."""
  if not isinstance(m, Mask):
    raise ValueError(f"mask: expected an ops.attention mask, got {type(m).__name__}")
  return m


def _kinds(full, empty, xp):
  """FULL where ``full``, EMPTY where ``empty``, else PARTIAL (int8)."""
  return xp.where(full, FULL, xp.where(empty, EMPTY, PARTIAL)).astype(xp.int8)


# The masks below share one shape (a checked size, element, block_kinds), not a formula.
@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Every pair allowed (bidirectional attention)."""

  def element(self, i, j, head, num_heads, lookup):
    return (i >= 0) | (j >= 0)   # all True, with the broadcast shape of i and j

  def block_kinds(self, grid, xp):
    return xp.full((1, 1, 1), FULL, xp.int8)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """``j <= i``."""

  def element(self, i, j, head, num_heads, lookup):
    return j <= i

  def block_kinds(self, grid, xp):
    return _kinds(grid.k_hi <= grid.q_lo, grid.k_lo > grid.q_hi, xp)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """Sliding window ``|i - j| < window``; with ``CausalMask``: keys i-w+1..i."""
  window: int

  def __post_init__(self):
    _check_positive_int("LocalMask.window", self.window)

  def element(self, i, j, head, num_heads, lookup):
    return abs(i - j) < self.window

  def block_kinds(self, grid, xp):
    far = xp.maximum(grid.q_hi - grid.k_lo, grid.k_hi - grid.q_lo)
    near = xp.maximum(xp.maximum(grid.k_lo - grid.q_hi, grid.q_lo - grid.k_hi), 0)
    return _kinds(far < self.window, near >= self.window, xp)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ChunkedMask(Mask):
  """``i // chunk == j // chunk`` (block-diagonal; Llama-4 style chunked attention)."""
  chunk: int

  def __post_init__(self):
    _check_positive_int("ChunkedMask.chunk", self.chunk)

  def element(self, i, j, head, num_heads, lookup):
    return _div(i, self.chunk) == _div(j, self.chunk)

  def block_kinds(self, grid, xp):
    return _group_kinds(grid, self.chunk, 0, xp)


def _group_kinds(grid: BlockGrid, group: int, shift, xp):
  """Kinds of ``(i + shift) // group == (j + shift) // group``."""
  qa, qb = (grid.q_lo + shift) // group, (grid.q_hi + shift) // group
  ka, kb = (grid.k_lo + shift) // group, (grid.k_hi + shift) // group
  return _kinds((qa == qb) & (ka == kb) & (qa == ka), (qb < ka) | (kb < qa), xp)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ShiftedGroupMask(Mask):
  """LongLoRA's shifted sparse attention (S2-Attn; Chen et al., 2023).

  Tokens attend within groups of ``group`` positions. Heads
  ``h < num_heads // 2`` use groups ``[0, G), [G, 2G), ...``; the other half
  use groups shifted by ``G // 2``: ``[0, G/2), [G/2, 3G/2), ...``. That is
  ``(i + s_h) // G == (j + s_h) // G`` with ``s_h = G // 2`` for the shifted
  heads. Deviation: LongLoRA rolls the sequence, so its last shifted group
  wraps around to the first ``G/2`` tokens; here the first shifted group is
  half-sized and nothing wraps (no attention from early to late tokens, which
  under a causal mask would leak the future). Compose with ``CausalMask()``
  for causal LMs.
  """
  group: int

  def __post_init__(self):
    _check_positive_int("ShiftedGroupMask.group", self.group)
    if self.group < 2:
      raise ValueError(f"ShiftedGroupMask.group must be >= 2, got {self.group}")

  def head_dependent(self) -> bool:
    return True

  def _shift(self, head, num_heads):
    return (head >= num_heads // 2) * (self.group // 2)

  def element(self, i, j, head, num_heads, lookup):
    s = self._shift(head, num_heads)
    return _div(i + s, self.group) == _div(j + s, self.group)

  def block_kinds(self, grid, xp):
    return _group_kinds(grid, self.group, self._shift(grid.head, grid.num_heads), xp)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class GlobalTokensMask(Mask):
  """The first ``n`` positions are global: ``i < n or j < n`` (sinks; Longformer,
  BigBird, StreamingLLM). Usually ``CausalMask() & (LocalMask(w) | GlobalTokensMask(n))``."""
  n: int

  def __post_init__(self):
    _check_positive_int("GlobalTokensMask.n", self.n)

  def element(self, i, j, head, num_heads, lookup):
    return (i < self.n) | (j < self.n)

  def block_kinds(self, grid, xp):
    full = (grid.q_hi < self.n) | (grid.k_hi < self.n)
    return _kinds(full, (grid.q_lo >= self.n) & (grid.k_lo >= self.n), xp)


@jax.tree_util.register_pytree_node_class
class DenseMask(Mask):
  """An explicit bool mask, ``[T, S]`` or per query head ``[Hq, T, S]``.

  The array may be traced (built under ``jit``); the block layout is then
  computed with jnp and its kv-list length is the number of kv blocks.
  Kernels read its tiles for PARTIAL blocks only.
  """

  def __init__(self, array):
    if not hasattr(array, "shape") or np.ndim(array) not in (2, 3):
      raise ValueError("DenseMask: array must have shape [T, S] or [Hq, T, S], "
                       f"got {getattr(array, 'shape', type(array).__name__)}")
    if array.dtype != np.bool_:
      raise ValueError(f"DenseMask: array must be bool, got dtype {array.dtype}")
    self.array = array if np.ndim(array) == 3 else array[None]

  def tree_flatten(self):
    return (self.array,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.array = children[0]
    return obj

  def head_dependent(self) -> bool:
    return self.array.shape[0] > 1

  def validate(self, seq_q, seq_kv, num_heads):
    h, t, s = self.array.shape
    if (t, s) != (seq_q, seq_kv) or h not in (1, num_heads):
      raise ValueError(f"DenseMask: array shape {tuple(self.array.shape)} does not match "
                       f"q/k: need [T, S] = [{seq_q}, {seq_kv}] or [Hq, T, S] = "
                       f"[{num_heads}, {seq_q}, {seq_kv}]")

  def element(self, i, j, head, num_heads, lookup):
    return lookup(self.array)

  def block_kinds(self, grid, xp):
    a = xp.asarray(self.array)
    h = a.shape[0]
    nq, nk = grid.q_lo.shape[1], grid.k_lo.shape[2]
    pad_t, pad_s = nq * grid.block_q - a.shape[1], nk * grid.block_kv - a.shape[2]
    a = a.reshape(h, 1, a.shape[1], a.shape[2])
    # Padded query rows replicate the last real row (they do not exist, so they
    # must not spoil "full"/"empty"); padded keys are False.
    a = xp.pad(a, ((0, 0), (0, 0), (0, pad_t), (0, 0)), mode="edge")
    a = xp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad_s)))
    a = a.reshape(h, nq, grid.block_q, nk, grid.block_kv)
    return _kinds(a.all(axis=(2, 4)), ~a.any(axis=(2, 4)), xp)


class _Combined(Mask):
  """Shared part of ``AndMask`` and ``OrMask``."""

  def __init__(self, a: Mask, b: Mask):
    self.a, self.b = a, b

  def tree_flatten(self):
    return (self.a, self.b), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)

  def head_dependent(self):
    return self.a.head_dependent() or self.b.head_dependent()

  def validate(self, seq_q, seq_kv, num_heads):
    self.a.validate(seq_q, seq_kv, num_heads)
    self.b.validate(seq_q, seq_kv, num_heads)

  def __eq__(self, other):
    return type(self) is type(other) and (self.a, self.b) == (other.a, other.b)

  def __hash__(self):
    return hash((type(self), self.a, self.b))

  def __repr__(self):
    op = "&" if isinstance(self, AndMask) else "|"
    return f"({self.a!r} {op} {self.b!r})"


@jax.tree_util.register_pytree_node_class
class AndMask(_Combined):
  """Pairs allowed by both masks."""

  def element(self, i, j, head, num_heads, lookup):
    return (self.a.element(i, j, head, num_heads, lookup)
            & self.b.element(i, j, head, num_heads, lookup))

  def block_kinds(self, grid, xp):
    return xp.minimum(self.a.block_kinds(grid, xp), self.b.block_kinds(grid, xp))


@jax.tree_util.register_pytree_node_class
class OrMask(_Combined):
  """Pairs allowed by either mask."""

  def element(self, i, j, head, num_heads, lookup):
    return (self.a.element(i, j, head, num_heads, lookup)
            | self.b.element(i, j, head, num_heads, lookup))

  def block_kinds(self, grid, xp):
    return xp.maximum(self.a.block_kinds(grid, xp), self.b.block_kinds(grid, xp))


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _div(x, n: int):
  """``x // n`` for non-negative ints; on jax values ``lax.div`` (truncating,
  no sign fix-up, which Mosaic lowers without device info)."""
  if isinstance(x, jax.Array):
    return jax.lax.div(x, jnp.asarray(n, x.dtype))
  return x // n


def _is_static(mask: Mask) -> bool:
  """True when no leaf is a tracer (the kinds can be computed in NumPy)."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(mask))


# --------------------------------------------------------------------------
# Block layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Per row block, the list of column blocks to visit.

  ``index[b, h, r, t]`` is the ``t``-th non-empty column block of row block
  ``r`` (ascending), ``kind[b, h, r, t]`` its kind (``EMPTY`` marks unused
  slots; their ``index`` repeats the last listed block so a pipelined
  kernel re-uses the block already in fast memory), ``count[b, h, r]`` the
  number of listed blocks. Leading dims ``b``/``h`` are 1 when the layout
  does not depend on batch/head (broadcast).
  """
  index: Any
  kind: Any
  count: Any

  @property
  def max_blocks(self) -> int:
    return self.index.shape[-1]


def block_kinds(mask: Mask, seq_q: int, seq_kv: int, block_q: int, block_kv: int,
                num_heads: int, segment_ids=None):
  """Block kinds of ``mask`` (and segment ids): int8 ``[B', H', nq, nk]``.

  Args:
    mask: the mask.
    seq_q, seq_kv: T and S.
    block_q, block_kv: block sizes; nq = cdiv(T, bq), nk = cdiv(S, bk).
    num_heads: number of query heads (for head-dependent masks).
    segment_ids: None or ``(q_segment_ids [B, T], kv_segment_ids [B, S])``;
      only equal ids attend.

  Returns:
    ``(kinds, bounds)``: kinds (NumPy when everything is static, else jnp),
    ``B' = B`` with segment ids else 1, ``H' = num_heads`` for a
    head-dependent mask else 1; ``bounds = (per_q_block, per_kv_block)``
    static upper bounds on the non-empty blocks of a query block (kv lists)
    and of a kv block (query lists), from the mask alone (segment ids only
    remove blocks); ``(nk, nq)`` for a traced mask.
  """
  mask.validate(seq_q, seq_kv, num_heads)
  static = _is_static(mask)
  xp = np if static else jnp
  nq, nk = -(-seq_q // block_q), -(-seq_kv // block_kv)
  q_lo = np.arange(nq) * block_q
  k_lo = np.arange(nk) * block_kv
  h = num_heads if mask.head_dependent() else 1
  grid = BlockGrid(
      q_lo=q_lo[None, :, None], q_hi=np.minimum(q_lo + block_q, seq_q)[None, :, None] - 1,
      k_lo=k_lo[None, None, :], k_hi=np.minimum(k_lo + block_kv, seq_kv)[None, None, :] - 1,
      head=np.arange(h)[:, None, None], num_heads=num_heads, block_q=block_q,
      block_kv=block_kv)
  kinds = xp.broadcast_to(mask.block_kinds(grid, xp), (h, nq, nk))
  if seq_kv % block_kv:   # the last kv block holds padding keys: never FULL
    kinds = xp.concatenate([kinds[..., :-1], xp.minimum(kinds[..., -1:], PARTIAL)], -1)
  kinds = kinds[None].astype(xp.int8)
  bounds = list_bounds(kinds) if static else (nk, nq)
  if segment_ids is not None:
    kinds = jnp.minimum(kinds, segment_kinds(*segment_ids, block_q, block_kv)[:, None])
  return kinds, bounds


def list_bounds(kinds: np.ndarray) -> tuple[int, int]:
  """Longest kv list and longest query list of static kinds (at least 1)."""
  nonempty = kinds > 0
  return max(1, int(nonempty.sum(-1).max())), max(1, int(nonempty.sum(-2).max()))


def segment_kinds(q_segment_ids, kv_segment_ids, block_q: int, block_kv: int):
  """Kinds of ``q_seg[i] == kv_seg[j]``, int8 [B, nq, nk] (jnp)."""
  def ranges(seg, block):
    seg = jnp.pad(seg, ((0, 0), (0, -seg.shape[1] % block)), mode="edge")
    seg = seg.reshape(seg.shape[0], -1, block)
    return seg.min(-1), seg.max(-1)
  q_min, q_max = ranges(q_segment_ids, block_q)
  k_min, k_max = ranges(kv_segment_ids, block_kv)
  q_min, q_max = q_min[:, :, None], q_max[:, :, None]
  k_min, k_max = k_min[:, None, :], k_max[:, None, :]
  full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
  return _kinds(full, (q_max < k_min) | (k_max < q_min), jnp)


def block_layout(kinds, max_blocks: int) -> BlockLayout:
  """Compacts kinds ``[B', H', R, C]`` into lists of non-empty column blocks.

  ``max_blocks`` (static) is the list length; a row with more non-empty
  blocks than that would be truncated, so pass an upper bound (from
  ``block_kinds``). Works on NumPy (static) and jnp (traced) kinds; the
  transposed kinds give the per-kv-block lists of query blocks.
  """
  xp = np if isinstance(kinds, np.ndarray) else jnp
  ncol = kinds.shape[-1]
  max_blocks = max(1, min(int(max_blocks), ncol))
  nonempty = kinds > 0
  # Non-empty columns first, in ascending order (stable sort of a 0/1 key).
  order = xp.argsort(xp.where(nonempty, 0, 1), axis=-1, stable=True)[..., :max_blocks]
  kind = xp.take_along_axis(kinds, order, axis=-1).astype(xp.int32)
  count = xp.minimum(nonempty.sum(-1), max_blocks).astype(xp.int32)
  last = xp.take_along_axis(order, xp.maximum(count - 1, 0)[..., None], axis=-1)
  index = xp.where(kind > 0, order, last).astype(xp.int32)
  return BlockLayout(index=index, kind=kind, count=count)


def valid_pairs(mask: Mask, i, j, head, num_heads: int, seq_kv: int, lookup: Lookup,
                q_seg=None, kv_seg=None):
  """The element mask kernels apply on PARTIAL blocks: mask, key padding, segments."""
  valid = mask.element(i, j, head, num_heads, lookup) & (j < seq_kv)
  if q_seg is not None:
    valid = valid & (q_seg == kv_seg)
  return valid
