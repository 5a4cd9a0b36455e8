"""Masks: element semantics, block kinds vs brute force, layouts, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import attention as A
from ops.attention import masks as M

RNG = np.random.default_rng(0)
T, S, H = 83, 97, 4
DENSE = RNG.random((T, S)) < 0.4
DENSE[5] = False   # an all-False row and an all-True row
DENSE[6] = True

MASKS = {
    "full": A.FullMask(),
    "causal": A.CausalMask(),
    "local": A.LocalMask(window=13),
    "chunked": A.ChunkedMask(chunk=20),
    "shifted": A.ShiftedGroupMask(group=16),
    "global": A.GlobalTokensMask(n=3),
    "dense": A.DenseMask(DENSE),
    "dense_heads": A.DenseMask(RNG.random((H, T, S)) < 0.2),
    "causal&local": A.CausalMask() & A.LocalMask(window=30),
    "causal&(local|global)": A.CausalMask() & (A.LocalMask(window=9) | A.GlobalTokensMask(4)),
    "causal&shifted": A.CausalMask() & A.ShiftedGroupMask(group=24),
    "chunked|dense": A.ChunkedMask(chunk=32) | A.DenseMask(DENSE),
}
# Masks whose kinds are exact (PARTIAL only where the block really is mixed).
EXACT = {"full", "causal", "local", "chunked", "shifted", "global", "dense", "dense_heads"}


def test_element_semantics():
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  np.testing.assert_array_equal(A.CausalMask().dense(T, S)[0], j <= i)
  np.testing.assert_array_equal(A.LocalMask(7).dense(T, S)[0], np.abs(i - j) < 7)
  causal_local = (A.CausalMask() & A.LocalMask(7)).dense(T, S)[0]
  np.testing.assert_array_equal(causal_local, (j <= i) & (j >= i - 6))   # keys i-w+1 .. i
  np.testing.assert_array_equal(A.ChunkedMask(10).dense(T, S)[0], i // 10 == j // 10)
  np.testing.assert_array_equal(A.GlobalTokensMask(2).dense(T, S)[0], (i < 2) | (j < 2))
  np.testing.assert_array_equal(A.DenseMask(DENSE).dense(T, S)[0], DENSE)
  either = (A.ChunkedMask(10) | A.GlobalTokensMask(2)).dense(T, S)[0]
  np.testing.assert_array_equal(either, (i // 10 == j // 10) | (i < 2) | (j < 2))


def test_shifted_group_mask_is_s2_attn():
  g, heads = 16, 6
  d = A.ShiftedGroupMask(g).dense(T, S, heads)
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  for h in range(heads):
    shift = g // 2 if h >= heads // 2 else 0
    np.testing.assert_array_equal(d[h], (i + shift) // g == (j + shift) // g)
  # The shifted half really differs (groups straddle the unshifted boundaries).
  assert not np.array_equal(d[0], d[-1]) and d[-1][g - 1, g] and not d[0][g - 1, g]


def _brute_kinds(dense, bq, bk, t, s, padded_keys_mask=True):
  """Per block: any / all over the real (unpadded) positions."""
  h = dense.shape[0]
  nq, nk = -(-t // bq), -(-s // bk)
  anyv = np.zeros((h, nq, nk), bool)
  allv = np.zeros((h, nq, nk), bool)
  for a in range(nq):
    for b in range(nk):
      blk = dense[:, a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
      anyv[:, a, b] = blk.any((1, 2))
      allv[:, a, b] = blk.all((1, 2)) & ((b + 1) * bk <= s or not padded_keys_mask)
  return anyv, allv


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("bq,bk", [(16, 16), (8, 32), (32, 8), (83, 97)])
def test_block_kinds_vs_brute_force(name, bq, bk):
  mask = MASKS[name]
  kinds, bounds = A.block_kinds(mask, T, S, bq, bk, H)
  assert isinstance(kinds, np.ndarray) and kinds.dtype == np.int8
  kinds = np.broadcast_to(kinds[0], (H,) + kinds.shape[2:])
  anyv, allv = _brute_kinds(mask.dense(T, S, H), bq, bk, T, S)
  assert not np.any((kinds == M.EMPTY) & anyv), "EMPTY block holds an allowed pair"
  assert not np.any((kinds == M.FULL) & ~allv), "FULL block holds a masked pair"
  if name in EXACT:
    np.testing.assert_array_equal(kinds, np.where(allv, M.FULL, np.where(anyv, M.PARTIAL,
                                                                         M.EMPTY)))
  nonempty = kinds > 0
  assert bounds == (max(1, nonempty.sum(-1).max()), max(1, nonempty.sum(-2).max()))


def test_segment_kinds_vs_brute_force():
  qs = np.sort(RNG.integers(0, 4, (2, T)), 1)
  ks = np.sort(RNG.integers(0, 4, (2, S)), 1)
  kinds = np.asarray(M.segment_kinds(jnp.asarray(qs), jnp.asarray(ks), 16, 16))
  for b in range(2):
    dense = (qs[b][:, None] == ks[b][None, :])[None]
    anyv, allv = _brute_kinds(dense, 16, 16, T, S, padded_keys_mask=False)   # (elsewhere)
    np.testing.assert_array_equal(kinds[b], np.where(allv[0], 2, np.where(anyv[0], 1, 0)))


def test_block_layout_lists():
  kinds = np.array([[[[0, 2, 0, 1], [0, 0, 0, 0], [1, 1, 0, 2]]]], np.int8)
  lay = A.block_layout(kinds, 3)
  np.testing.assert_array_equal(lay.count[0, 0], [2, 0, 3])
  np.testing.assert_array_equal(lay.index[0, 0], [[1, 3, 3], [0, 0, 0], [0, 1, 3]])
  np.testing.assert_array_equal(lay.kind[0, 0], [[2, 1, 0], [0, 0, 0], [1, 1, 2]])
  # jnp (traced) compaction gives the same lists.
  traced = jax.jit(lambda x: A.block_layout(x, 3))(jnp.asarray(kinds))
  for a, b in zip(jax.tree_util.tree_leaves(traced), jax.tree_util.tree_leaves(lay)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_traced_dense_mask_and_segments_under_jit():
  qs = jnp.asarray(np.sort(RNG.integers(0, 3, (2, T)), 1))
  ks = jnp.asarray(np.sort(RNG.integers(0, 3, (2, S)), 1))
  static, _ = A.block_kinds(A.CausalMask() & A.DenseMask(DENSE), T, S, 16, 32, H)

  @jax.jit
  def f(dense, qs, ks):
    kinds, bounds = A.block_kinds(A.CausalMask() & A.DenseMask(dense), T, S, 16, 32, H, (qs, ks))
    assert bounds == (-(-S // 32), -(-T // 16))   # traced mask: every block
    return kinds
  traced = np.asarray(f(jnp.asarray(DENSE), qs, ks))
  seg = np.asarray(M.segment_kinds(qs, ks, 16, 32))[:, None]
  np.testing.assert_array_equal(traced, np.minimum(static, seg))


def test_masks_are_pytrees():
  mask = A.CausalMask() & (A.LocalMask(5) | A.DenseMask(DENSE))
  leaves, tree = jax.tree_util.tree_flatten(mask)
  assert len(leaves) == 1 and leaves[0].shape == (1, T, S)
  out = jax.jit(lambda m: m.element(jnp.arange(T)[:, None], jnp.arange(S)[None], 0, 1,
                                    lambda a: a[0]))(mask)
  np.testing.assert_array_equal(np.asarray(out), mask.dense(T, S)[0])


@pytest.mark.parametrize("make", [
    lambda: A.LocalMask(0), lambda: A.ChunkedMask(-3), lambda: A.ShiftedGroupMask(1),
    lambda: A.GlobalTokensMask(1.5), lambda: A.DenseMask(np.ones((T, S), np.int32)),
    lambda: A.DenseMask(np.ones((T,), bool)), lambda: A.CausalMask() & "causal",
])
def test_bad_masks(make):
  with pytest.raises(ValueError):
    make()


def test_dense_mask_shape_must_match():
  with pytest.raises(ValueError, match="DenseMask"):
    A.block_kinds(A.DenseMask(DENSE), T + 1, S, 16, 16, H)
  with pytest.raises(ValueError, match="DenseMask"):
    A.block_kinds(A.DenseMask(np.ones((3, T, S), bool)), T, S, 16, 16, H)
