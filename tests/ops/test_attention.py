"""ops.attention XLA path vs a float64 dense reference: forward and dq/dk/dv.

Kernels (interpret mode, cross-lowering) are in test_attention_kernels.py and
reuse ``check`` from here.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import attention as A
from tests.numerics import TOL, assert_rel_close

RNG = np.random.default_rng(0)


def rand(shape, dtype=jnp.float32, rng=RNG):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def qkv(b, t, s, hq, hkv, d, dtype=jnp.float32):
  return rand((b, t, hq, d), dtype), rand((b, s, hkv, d), dtype), rand((b, s, hkv, d), dtype)


def reference64(q, k, v, mask=None, cotangent=None, **kw):
  """float64 output (and grads of <o, cotangent>) of the dense reference."""
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
    f = lambda q, k, v: A.attention_reference(q, k, v, mask, **kw)
    if cotangent is None:
      return np.asarray(jax.jit(f)(*args)), None
    o, grads = _value_and_vjp(f, args, jnp.asarray(np.asarray(cotangent, np.float64)))
    return np.asarray(o), [np.asarray(g) for g in grads]


def _value_and_vjp(f, args, cotangent):
  """``f(*args)`` and its vjp with ``cotangent``, in one jitted call."""
  def run(args, w):
    o, vjp = jax.vjp(f, *args)
    return o, vjp(w.astype(o.dtype))
  return jax.jit(run)(args, cotangent)


def check(q, k, v, mask=None, *, grads=True, tol=None, **kw):
  """block_sparse_attention (with ``kw``: impl, block sizes, ...) vs float64."""
  ref_kw = {n: kw[n] for n in ("segment_ids", "scale", "softcap") if n in kw}
  if isinstance(ref_kw.get("segment_ids"), jax.Array):
    ref_kw["segment_ids"] = (ref_kw["segment_ids"],) * 2
  tol = tol or TOL[jnp.dtype(q.dtype).name]
  w = rand(q.shape, jnp.float32)
  ref_o, ref_g = reference64(q, k, v, mask, w if grads else None, **ref_kw)
  f = lambda q, k, v: A.block_sparse_attention(q, k, v, mask, **kw)
  if grads:
    o, got = _value_and_vjp(f, (q, k, v), w)
  else:
    o = jax.jit(f)(q, k, v)
  assert o.shape == q.shape and o.dtype == q.dtype
  assert_rel_close(o, ref_o, tol)
  if grads:
    for name, g, r, x in zip("qkv", got, ref_g, (q, k, v)):
      assert g.shape == x.shape and g.dtype == x.dtype
      assert_rel_close(g, r, tol * 2, what=f"d{name}")
  return o, got if grads else None


def sorted_segments(b, n, num, rng=RNG):
  return jnp.asarray(np.sort(rng.integers(0, num, (b, n)), axis=1), jnp.int32)


def test_reference_matches_explicit_softmax():
  """The dense reference itself, against a loop over rows in NumPy."""
  q, k, v = qkv(1, 5, 7, 2, 1, 8)
  mask = A.CausalMask() & A.LocalMask(3)
  o, _ = reference64(q, k, v, mask, softcap=2.0)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  for h in range(2):
    for i in range(5):
      keys = [j for j in range(7) if j <= i and abs(i - j) < 3]
      x = np.array([qn[0, i, h] @ kn[0, j, 0] for j in keys]) / np.sqrt(8)
      x = 2.0 * np.tanh(x / 2.0)
      p = np.exp(x - x.max())
      np.testing.assert_allclose(o[0, i, h], (p / p.sum()) @ vn[0, keys, 0], rtol=1e-12)


# (B, T, S, Hq, Hkv, D), mask, extra kwargs
CASES = {
    "mqa_causal_local": ((2, 77, 77, 8, 1, 64), A.CausalMask() & A.LocalMask(20),
                         dict(block_q=16, block_kv=32)),
    "t1_gqa_d128": ((1, 1, 50, 8, 2, 128), None, dict(block_q=16, block_kv=16)),
    "t1_chunked": ((1, 1, 50, 2, 2, 64), A.ChunkedMask(8), {}),
    "cross_chunked_global_seg_softcap": (
        (1, 130, 70, 4, 2, 64), A.ChunkedMask(32) | A.GlobalTokensMask(3),
        dict(block_q=32, block_kv=16, softcap=5.0,
             segment_ids=(sorted_segments(1, 130, 3), sorted_segments(1, 70, 3)))),
    "s2attn_segments_scale": ((2, 96, 96, 4, 4, 64), A.CausalMask() & A.ShiftedGroupMask(24),
                              dict(block_q=32, block_kv=32, scale=0.3,
                                   segment_ids=sorted_segments(2, 96, 3))),
    "dense_heads": ((1, 64, 100, 8, 2, 64),
                    A.DenseMask(RNG.random((8, 64, 100)) < 0.05), dict(block_q=16, block_kv=32)),
    "local_or_global_default_blocks": ((1, 100, 100, 2, 1, 64),
                                       A.LocalMask(9) | A.GlobalTokensMask(2), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_xla_path_vs_float64(name):
  shape, mask, kw = CASES[name]
  check(*qkv(*shape), mask, impl="xla", **kw)


@pytest.mark.parametrize("name", ["cross_chunked_global_seg_softcap", "s2attn_segments_scale"])
def test_xla_path_query_chunks(name, monkeypatch):
  """Two query blocks per chunk of the outer scan (the last chunk padded)."""
  from ops.attention import reference
  (b, t, s, hq, hkv, d), mask, kw = CASES[name]
  monkeypatch.setattr(reference, "_CHUNK_BYTES", 2 * kw["block_q"] * 4 * b * hq * kw["block_kv"])
  t = 2 * kw["block_q"] + 5   # 3 query blocks: a chunk of 2, then a padded one
  segs = (sorted_segments(b, t, 3), sorted_segments(b, s, 3))
  check(*qkv(b, t, s, hq, hkv, d), mask, impl="xla", **{**kw, "segment_ids": segs})


def test_xla_path_bfloat16():
  check(*qkv(1, 77, 77, 4, 2, 64, jnp.bfloat16), A.CausalMask(), impl="xla", block_q=32,
        block_kv=32)


def test_auto_is_xla_on_cpu():
  q, k, v = qkv(1, 40, 40, 2, 1, 64)
  mask = A.CausalMask() & A.LocalMask(8)
  np.testing.assert_array_equal(
      np.asarray(A.block_sparse_attention(q, k, v, mask, block_q=16, block_kv=16)),
      np.asarray(A.block_sparse_attention(q, k, v, mask, block_q=16, block_kv=16, impl="xla")))


def test_fully_masked_rows_are_zero_not_nan():
  # Rows of segment 9 see no key; LocalMask(5) with S << T leaves rows >= S+4 empty.
  q, k, v = qkv(1, 60, 20, 2, 1, 64)
  q_seg = jnp.asarray(np.r_[np.zeros(30), np.full(30, 9)][None], jnp.int32)
  kv_seg = jnp.zeros((1, 20), jnp.int32)
  o, (dq, _, _) = check(q, k, v, A.LocalMask(5), segment_ids=(q_seg, kv_seg), impl="xla",
                        block_q=16, block_kv=16)
  empty = np.r_[np.arange(24, 30), np.arange(30, 60)]
  assert np.all(np.asarray(o)[0, empty] == 0) and np.all(np.asarray(o)[0, :24] != 0)
  assert np.all(np.asarray(dq)[0, empty] == 0)


def test_jit_traced_mask_and_segments():
  q, k, v = qkv(2, 50, 50, 2, 2, 64)
  dense = jnp.asarray(RNG.random((50, 50)) < 0.5)
  seg = sorted_segments(2, 50, 2)

  @jax.jit
  def f(q, k, v, dense, seg):
    return A.block_sparse_attention(q, k, v, A.CausalMask() & A.DenseMask(dense),
                                    segment_ids=seg, block_q=16, block_kv=16, impl="xla")
  ref, _ = reference64(q, k, v, A.CausalMask() & A.DenseMask(np.asarray(dense)),
                       segment_ids=(seg, seg))
  assert_rel_close(f(q, k, v, dense, seg), ref, TOL["float32"])


def test_vmap_and_grad_through_vmap():
  q, k, v = (x.reshape(3, 1, *x.shape[1:]) for x in qkv(3, 33, 33, 2, 1, 64))
  mask = A.CausalMask() & A.LocalMask(7)
  op = lambda q, k, v: A.block_sparse_attention(q, k, v, mask, block_q=16, block_kv=16)
  out, g = jax.jit(jax.value_and_grad(lambda q: jnp.sum(jax.vmap(op)(q, k, v) ** 2)))(q)
  one, g1 = jax.jit(jax.value_and_grad(lambda q: jnp.sum(op(q[1], k[1], v[1]) ** 2)))(q)
  np.testing.assert_allclose(g[1], g1[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, one + sum(float(jnp.sum(op(q[n], k[n], v[n]) ** 2))
                                            for n in (0, 2)), rtol=1e-5)


# --------------------------------------------------------------------------
# topk_block_attention


def topk_dense_mask(q, k, top_k, bs, local, sink, causal, token_scores=None, bq=None):
  """Independent NumPy selection: [Hq, T, S] bool mask of the chosen blocks
  (query blocks of ``bq`` rows, default ``bs``; scored by block means, or by
  the block's rows of ``token_scores[0]``)."""
  qn, kn = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]
  t, hq, _ = qn.shape
  s, hkv, _ = kn.shape
  bq = bq or bs
  nq, nk = -(-t // bq), -(-s // bs)
  out = np.zeros((hq, t, s), bool)
  for h in range(hq):
    kbar = np.stack([kn[c * bs:(c + 1) * bs, h // (hq // hkv)].mean(0) for c in range(nk)])
    for r in range(nq):
      first, last = r * bq, min((r + 1) * bq, t) - 1
      qbar = qn[first:last + 1, h].mean(0)
      eligible = [c for c in range(nk) if not causal or c * bs <= last]
      forced = [c for c in eligible if c < sink or last // bs - local < c <= last // bs]
      if token_scores is None:
        score = kbar @ qbar
      else:
        score = np.asarray(token_scores, np.float64)[0, h, first:last + 1].sum(0)
      rest = sorted((c for c in eligible if c not in forced), key=lambda c: -score[c])
      for c in forced + rest[:top_k]:
        out[h, first:last + 1, c * bs:(c + 1) * bs] = True
  if causal:
    out &= np.tril(np.ones((t, s), bool))
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_topk_vs_independent_selection(causal):
  q, k, v = qkv(1, 150, 150, 4, 2, 64)
  w = rand(q.shape)
  kw = dict(top_k=1, block_size=32, local_blocks=1, sink_blocks=1, causal=causal, impl="xla")
  f = lambda q, k, v: A.topk_block_attention(q, k, v, **kw)
  mask = A.DenseMask(topk_dense_mask(q, k, 1, 32, 1, 1, causal))
  ref_o, ref_g = reference64(q, k, v, mask, w)
  o, got = _value_and_vjp(f, (q, k, v), w)
  assert_rel_close(o, ref_o, TOL["float32"])
  for g, r in zip(got, ref_g):
    assert_rel_close(g, r, 2 * TOL["float32"])


@pytest.mark.parametrize("bq", [8, 20])
def test_topk_query_block_smaller_than_kv_block(bq):
  """Query blocks of ``bq`` rows select among kv blocks of 32 (forced local
  blocks follow each query block's last row), with and without scores."""
  q, k, v = qkv(1, 150, 150, 4, 2, 64)
  w = rand(q.shape)
  scores = rand((1, 4, 150, 5))
  kw = dict(top_k=1, block_size=32, query_block=bq, local_blocks=1, sink_blocks=1, impl="xla")
  for ts in (None, scores):
    o, got = _value_and_vjp(lambda q, k, v: A.topk_block_attention(
        q, k, v, token_scores=ts, **kw), (q, k, v), w)
    ref_o, ref_g = reference64(q, k, v, A.DenseMask(topk_dense_mask(
        q, k, 1, 32, 1, 1, True, token_scores=ts, bq=bq)), w)
    assert_rel_close(o, ref_o, TOL["float32"])
    for g, r in zip(got, ref_g):
      assert_rel_close(g, r, 2 * TOL["float32"])


def test_topk_token_scores():
  """Caller scores (here random, as NSA's compressed-attention probabilities
  would be) replace the block means; per-token gates <q_i, mean k> summed
  over the block rank as the default block-mean score."""
  q, k, v = qkv(1, 150, 150, 4, 2, 64)
  w = rand(q.shape)
  kw = dict(top_k=1, block_size=32, local_blocks=1, sink_blocks=1, impl="xla")
  scores = rand((1, 4, 150, 5))
  o, got = _value_and_vjp(lambda q, k, v: A.topk_block_attention(
      q, k, v, token_scores=scores, **kw), (q, k, v), w)
  ref_o, ref_g = reference64(q, k, v, A.DenseMask(topk_dense_mask(
      q, k, 1, 32, 1, 1, True, token_scores=scores)), w)
  assert_rel_close(o, ref_o, TOL["float32"])
  for g, r in zip(got, ref_g):
    assert_rel_close(g, r, 2 * TOL["float32"])
  kbar = jnp.stack([k[:, c * 32:(c + 1) * 32].mean(1) for c in range(5)], 1)   # [B, nk, Hkv, D]
  gates = jnp.einsum("bthd,bkhd->bhtk", q, jnp.repeat(kbar, 2, axis=2))
  chex.assert_trees_all_close(A.topk_block_attention(q, k, v, token_scores=gates, **kw),
                              A.topk_block_attention(q, k, v, **kw), rtol=1e-5, atol=1e-6)


def test_topk_scores_per_kv_head_are_shared_by_the_group():
  """[B, Hkv, T, nk] scores select once per kv head: the same attention and
  gradients as those scores repeated over the group's query heads."""
  q, k, v = qkv(2, 150, 150, 8, 2, 64)
  w = rand(q.shape)
  scores = rand((2, 2, 150, 5))
  kw = dict(top_k=1, block_size=32, query_block=8, impl="xla")
  shared = _value_and_vjp(lambda q, k, v: A.topk_block_attention(
      q, k, v, token_scores=scores, **kw), (q, k, v), w)
  per_head = _value_and_vjp(lambda q, k, v: A.topk_block_attention(
      q, k, v, token_scores=jnp.repeat(scores, 4, axis=1), **kw), (q, k, v), w)
  chex.assert_trees_all_close(shared, per_head, rtol=1e-5, atol=1e-5)


def test_quest_scores_bound_the_block_maxima():
  """Explicit NumPy Quest bound per (kv head, query, block), S not a multiple
  of the block; it bounds the group's summed in-block maxima of <q, k>."""
  q, k, _ = qkv(2, 37, 70, 4, 2, 16)
  got = np.asarray(A.quest_scores(q, k, block_size=32))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  want = np.zeros((2, 2, 37, 3))
  maxima = np.zeros_like(want)
  for b in range(2):
    for g in range(2):
      for c in range(3):
        keys = kn[b, c * 32:(c + 1) * 32, g]
        for h in (2 * g, 2 * g + 1):
          want[b, g, :, c] += np.maximum(qn[b, :, h] * keys.min(0),
                                         qn[b, :, h] * keys.max(0)).sum(-1)
          maxima[b, g, :, c] += (qn[b, :, h] @ keys.T).max(-1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert np.all(got >= maxima - 1e-4)


def test_topk_covering_all_blocks_is_dense_causal():
  q, k, v = qkv(2, 100, 100, 8, 2, 64)
  w = rand(q.shape)
  seg = sorted_segments(2, 100, 3)
  f = lambda q, k, v: A.topk_block_attention(q, k, v, top_k=4, block_size=32, segment_ids=seg,
                                             softcap=20.0, impl="xla")
  ref_o, ref_g = reference64(q, k, v, A.CausalMask(), w, segment_ids=(seg, seg), softcap=20.0)
  o, got = _value_and_vjp(f, (q, k, v), w)
  assert_rel_close(o, ref_o, TOL["float32"])
  for g, r in zip(got, ref_g):
    assert_rel_close(g, r, 2 * TOL["float32"])


# --------------------------------------------------------------------------
# decode_attention


def decode_reference(q, kc, vc, lengths, mask_fn=None, **kw):
  """Last row of float64 causal attention over each sequence's prefix."""
  out = []
  for b, n in enumerate(np.asarray(lengths)):
    if n == 0:
      out.append(np.zeros(q.shape[1:]))
      continue
    qf = jnp.zeros((1, n) + q.shape[1:], q.dtype).at[0, n - 1].set(q[b])
    mask = A.CausalMask() if mask_fn is None else A.CausalMask() & mask_fn(b, n)
    o, _ = reference64(qf, kc[b:b + 1, :n], vc[b:b + 1, :n], mask, **kw)
    out.append(o[0, -1])
  return np.stack(out)


def test_decode_ragged_lengths_vs_last_row():
  kc, vc = rand((4, 200, 2, 64)), rand((4, 200, 2, 64))
  q = rand((4, 8, 64))
  lengths = jnp.asarray([1, 77, 200, 0], jnp.int32)
  o = jax.jit(lambda *a: A.decode_attention(*a, block_size=32, impl="xla"))(q, kc, vc, lengths)
  assert_rel_close(o, decode_reference(q, kc, vc, lengths), TOL["float32"])
  assert np.all(np.asarray(o)[3] == 0)


def test_decode_bfloat16_and_jit():
  kc, vc = rand((2, 130, 1, 128), jnp.bfloat16), rand((2, 130, 1, 128), jnp.bfloat16)
  q = rand((2, 4, 128), jnp.bfloat16)
  lengths = jnp.asarray([130, 64], jnp.int32)
  o = jax.jit(lambda *a: A.decode_attention(*a, block_size=64, scale=0.2, softcap=5.0))(
      q, kc, vc, lengths)
  assert o.dtype == jnp.bfloat16
  assert_rel_close(o, decode_reference(q, kc, vc, lengths, scale=0.2, softcap=5.0),
                   TOL["bfloat16"])


def quest_mask(q, kc, lengths, top_k, bs):
  """Independent NumPy Quest selection, as a per-sequence key mask [B, Hq, S]."""
  qn, kn = np.asarray(q, np.float64), np.asarray(kc, np.float64)
  b, hq, _ = qn.shape
  s, hkv = kn.shape[1:3]
  rep = hq // hkv
  out = np.zeros((b, hq, s), bool)
  for i in range(b):
    n = int(lengths[i])
    for g in range(hkv):
      ubs = []
      for c in range(-(-n // bs)):
        keys = kn[i, c * bs:min((c + 1) * bs, n), g]
        ubs.append(sum(np.maximum(qn[i, h] * keys.min(0), qn[i, h] * keys.max(0)).sum()
                       for h in range(g * rep, (g + 1) * rep)))
      for c in np.argsort(ubs)[::-1][:top_k]:
        out[i, g * rep:(g + 1) * rep, c * bs:(c + 1) * bs] = True
  return out


def test_decode_quest_selection():
  kc, vc = rand((2, 256, 2, 64)), rand((2, 256, 2, 64))
  q = rand((2, 4, 64))
  lengths = jnp.asarray([256, 100], jnp.int32)
  keep = quest_mask(q, kc, lengths, 2, 32)
  op = jax.jit(lambda *a, top_k_blocks: A.decode_attention(
      *a, top_k_blocks=top_k_blocks, block_size=32, impl="xla"), static_argnames="top_k_blocks")
  mask_fn = lambda b, n: A.DenseMask(np.broadcast_to(keep[b, :, None, :n], (4, n, n)).copy())
  assert_rel_close(op(q, kc, vc, lengths, top_k_blocks=2),
                   decode_reference(q, kc, vc, lengths, mask_fn), TOL["float32"])
  assert_rel_close(op(q, kc, vc, lengths, top_k_blocks=8),
                   decode_reference(q, kc, vc, lengths), TOL["float32"])


# --------------------------------------------------------------------------
# Bad input


Q, K = jnp.ones((1, 16, 4, 8)), jnp.ones((1, 16, 2, 8))
BAD = {
    "q rank": (lambda: A.block_sparse_attention(Q[0], K, K), "q must have shape"),
    "k v shapes": (lambda: A.block_sparse_attention(Q, K, K[:, :8]), "same shape"),
    "head dim": (lambda: A.block_sparse_attention(Q, K[..., :4], K[..., :4]), "head_dim"),
    "heads": (lambda: A.block_sparse_attention(Q[:, :, :3], K, K), "must divide"),
    "batch": (lambda: A.block_sparse_attention(jnp.ones((2, 16, 4, 8)), K, K), "batch"),
    "int dtype": (lambda: A.block_sparse_attention(Q.astype(jnp.int32), K, K), "dtype"),
    "mixed dtype": (lambda: A.block_sparse_attention(Q.astype(jnp.bfloat16), K, K), "dtype"),
    "mask type": (lambda: A.block_sparse_attention(Q, K, K, "causal"), "mask"),
    "mask shape": (lambda: A.block_sparse_attention(Q, K, K, A.DenseMask(np.ones((16, 9), bool))),
                   "DenseMask"),
    "segments S!=T": (lambda: A.block_sparse_attention(Q, K[:, :8], K[:, :8],
                                                       segment_ids=jnp.zeros((1, 16), int)),
                      "pair"),
    "segments shape": (lambda: A.block_sparse_attention(Q, K, K, segment_ids=jnp.zeros((1, 15),
                                                                                      int)),
                       "segment_ids"),
    "segments dtype": (lambda: A.block_sparse_attention(Q, K, K, segment_ids=jnp.zeros((1, 16))),
                       "integer"),
    "impl": (lambda: A.block_sparse_attention(Q, K, K, impl="cuda"), "impl"),
    "tpu blocks": (lambda: A.block_sparse_attention(Q, K, K, block_kv=64, impl="pallas_tpu"),
                   "block_kv % 128"),
    "gpu blocks": (lambda: A.block_sparse_attention(Q, K, K, block_q=48, impl="pallas_gpu"),
                   "powers of two"),
    "block size": (lambda: A.block_sparse_attention(Q, K, K, block_q=0), "block_q"),
    "softcap": (lambda: A.block_sparse_attention(Q, K, K, softcap=-1.0), "softcap"),
    "scale": (lambda: A.block_sparse_attention(Q, K, K, scale=0.0), "scale"),
    "top_k": (lambda: A.topk_block_attention(Q, K, K, top_k=-1), "top_k"),
    "topk block": (lambda: A.topk_block_attention(Q, K, K, top_k=1, block_size=0), "block_size"),
    "topk query block": (lambda: A.topk_block_attention(Q, K, K, top_k=1, query_block=0),
                         "query_block"),
    "topk scores": (lambda: A.topk_block_attention(Q, K, K, top_k=1, block_size=8,
                                                   token_scores=jnp.zeros((1, 1, 2, 3))),
                    "token_scores"),
    "quest block": (lambda: A.quest_scores(Q, K, block_size=0), "block_size"),
    "topk nothing": (lambda: A.topk_block_attention(Q, K, K, top_k=0, local_blocks=0,
                                                    sink_blocks=0), ">= 1"),
    "decode q rank": (lambda: A.decode_attention(Q, K, K, jnp.ones(1, int)), "q must have shape"),
    "decode lengths": (lambda: A.decode_attention(Q[:, 0], K, K, jnp.ones(2, int)), "lengths"),
    "decode lengths dtype": (lambda: A.decode_attention(Q[:, 0], K, K, jnp.ones(1)), "lengths"),
    "decode top_k": (lambda: A.decode_attention(Q[:, 0], K, K, jnp.ones(1, int), top_k_blocks=0),
                     "top_k_blocks"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
  fn, match = BAD[name]
  with pytest.raises(ValueError, match=match):
    fn()
