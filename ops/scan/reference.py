"""Linear-RNN scans in pure jnp: the step-by-step specification and the XLA paths.

Three recurrences, all with a float32 (float64 under ``jax_enable_x64`` with
float64 inputs) state:

* ``linear_scan``:  h_t = a_t * h_{t-1} + b_t                      (diagonal)
* linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = q_t S_t
* delta rule:       S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1}
                          + beta_t k_t^T v_t,                       o_t = q_t S_t

(q_t, k_t, v_t are row vectors, S_t is [K, V].) The ``*_steps`` functions run
the recurrence one token at a time with ``lax.scan``; they are the
specification the tests compare against in float64, and
``linear_attention_steps`` is the baseline of ``benchmarks/scan.py``.

The chunked algorithms split the sequence into chunks of C tokens. Inside a
chunk the work is a masked, decay-weighted quadratic form (matmuls); only the
[K, V] state crosses chunk boundaries. With G the cumulative log decay inside
the chunk (G_i = sum_{l <= i} g_l, so G_i - G_j <= 0 for j <= i) and S the
state entering the chunk:

  o_i   = (q_i * exp(G_i)) S + sum_{j <= i} (sum_d q_id k_jd exp(G_id - G_jd)) v_j
  S_out = exp(G_C) * S + sum_j (k_j * exp(G_C - G_j))^T v_j

Every exponent that is evaluated is a difference G_i - G_j with j <= i (or a
G_i itself), so it is <= 0 for decays in (0, 1]: strong decays underflow to 0
instead of overflowing (no exp(-G) factorisation). For the per-key-dim (GLA)
decay exp(G_id - G_jd) does not factor out of the q.k sum. The XLA path
(``_intra_scores``) factors it through each chunk's middle row r, one
matmul, when every |G - G_r| in the batch is <= ``ONE_MATMUL_SPAN`` (60:
both factors stay far from float32 overflow and subnormals; the one
exception to the rule above); otherwise it builds the scores in pieces
where it factors through a row r with j <= r <= i, in the spirit of the
secondary chunking of Yang et al. 2024 ("Gated Linear Attention
Transformers with Hardware-Efficient Training", sec. 4), by halving the
chunk recursively. (Their two-level form, sub-chunks of 16 with [16, 16, K]
diagonal blocks, was slower than the halving on CPU: benchmarks/README.md.) The
kernels step the state through sub-chunks of 16 tokens and evaluate each
sub-chunk's scores element-wise in log space ([16, 16, K], ``pair_decay``).

The per-chunk functions below that take 2-D tiles (``chunk_forward``,
``chunk_backward``, ``delta_chunk_forward``) are also the bodies of the Pallas
kernels in ``tpu.py`` and ``gpu.py``. They keep the state transposed,
St = S^T of shape [V, K], so that every decay broadcast is along rows and no
in-kernel transpose of a vector is needed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops.common import next_pow2

Array = jax.Array


def acc_dtype(*xs) -> jnp.dtype:
  """float32, or float64 when any input is float64 (the reference in tests)."""
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs if x is not None])


def _time_major(x: Array) -> Array:
  return jnp.moveaxis(x, 1, 0)


# ------------------------------------------------------------------ linear_scan


def linear_scan_sequential(a: Array, b: Array, h0: Array,
                           reverse: bool = False) -> tuple[Array, Array]:
  """h_t = a_t * h_{t-1} + b_t one step at a time (``lax.scan`` over T).

  Args:
    a, b: [B, T, D]. h0: [B, D], the state before the first step (before
      t = T - 1 when ``reverse``).
    reverse: run from t = T - 1 down to 0 (h_t = a_t * h_{t+1} + b_t).

  Returns:
    h [B, T, D] in the dtype of ``a * b``, and the last state computed [B, D]
    in the accumulation dtype.
  """
  acc = acc_dtype(a, b, h0)

  def step(h, ab):
    h = ab[0].astype(acc) * h + ab[1].astype(acc)
    return h, h

  h_last, hs = lax.scan(step, h0.astype(acc), (_time_major(a), _time_major(b)),
                        reverse=reverse)
  return jnp.moveaxis(hs, 0, 1).astype(jnp.result_type(a, b)), h_last


def linear_scan_associative(a: Array, b: Array, h0: Array,
                            reverse: bool = False) -> tuple[Array, Array]:
  """Same as ``linear_scan_sequential`` with ``lax.associative_scan``.

  The pairs (a, b) compose as affine maps, (a1, b1) then (a2, b2) =
  (a1 a2, a2 b1 + b2): O(log T) depth, O(T) work. h0 is folded into the
  first step's b.
  """
  acc = acc_dtype(a, b, h0)
  a32, b32 = a.astype(acc), b.astype(acc)
  first = -1 if reverse else 0
  b32 = b32.at[:, first].add(a32[:, first] * h0.astype(acc))

  def compose(x, y):
    return x[0] * y[0], y[0] * x[1] + y[1]

  _, h = lax.associative_scan(compose, (a32, b32), axis=1, reverse=reverse)
  last = 0 if reverse else -1
  return h.astype(jnp.result_type(a, b)), h[:, last]


# --------------------------------------------------- shared chunk-level algebra


def _mm(x: Array, y: Array) -> Array:
  """x @ y for 2-D tiles, float32 accumulation (kernel-safe)."""
  return lax.dot_general(x, y, (((1,), (0,)), ((), ())),
                         preferred_element_type=acc_dtype(x, y))


def _mm_nt(x: Array, y: Array) -> Array:
  """x @ y.T for 2-D tiles."""
  return lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                         preferred_element_type=acc_dtype(x, y))


def _mm_tn(x: Array, y: Array) -> Array:
  """x.T @ y for 2-D tiles."""
  return lax.dot_general(x, y, (((0,), (0,)), ((), ())),
                         preferred_element_type=acc_dtype(x, y))


def _causal(n: int, strict: bool = False) -> Array:
  """[n, n] bool, True where column j <= row i (j < i if ``strict``)."""
  i = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  j = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return j < i if strict else j <= i


def _masked_exp(x: Array, mask: Array) -> Array:
  """exp(x) where ``mask`` else 0, without evaluating exp off the mask."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def decay_matrix(g_col: Array, g_row: Array, strict: bool = False) -> Array:
  """E_ij = exp(G_i - G_j) for j <= i (j < i if ``strict``), else 0.

  Args:
    g_col: [..., C, 1] cumulative log decay; g_row: the same as [..., 1, C].
  """
  return _masked_exp(g_col - g_row, _causal(g_col.shape[-2], strict))


def pair_decay(g: Array) -> Array:
  """W_ijd = exp(G_id - G_jd) for j <= i, else 0: [..., c, K] -> [..., c, c, K]."""
  mask = _causal(g.shape[-2])[..., None]
  return _masked_exp(g[..., :, None, :] - g[..., None, :, :], mask)


def scores_3d(q: Array, k: Array, w: Array) -> Array:
  """A_ij = sum_d q_id k_jd W_ijd: the per-key-decay scores of one block."""
  return jnp.sum(q[..., :, None, :] * k[..., None, :, :] * w, axis=-1)


def _last_row(x: Array) -> Array:
  """x[-1:] of a 2-D tile, as a masked sum (Triton cannot slice values)."""
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(rows == x.shape[0] - 1, x, 0.0), axis=0,
                 keepdims=True)


def _scores(q, k, g, g_row):
  """Causal decay-weighted scores of one chunk and the weights used."""
  if g_row is None:  # per-key decay: element-wise in log space
    w = pair_decay(g)
    return scores_3d(q, k, w), w
  e = decay_matrix(g, g_row)
  return _mm_nt(q, k) * e, e


def chunk_forward(q, k, v, g, g_row, st):
  """One chunk of linear attention on 2-D float32 tiles (kernel body).

  Args:
    q, k: [c, K]. v: [c, V]. g: [c, Kg] cumulative log decay in the chunk
      (Kg = 1: per head; Kg = K: per key dim). g_row: g as [1, c] when
      Kg = 1, else None. st: [V, K], the transposed state entering the chunk.

  Returns:
    o [c, V] and the transposed state after the chunk [V, K].
  """
  g_last = _last_row(g)
  a, _ = _scores(q, k, g, g_row)
  o = _mm_nt(q * jnp.exp(g), st) + _mm(a, v)
  st = st * jnp.exp(g_last) + _mm_tn(v, k * jnp.exp(g_last - g))
  return o, st


def chunk_backward(q, k, v, g, g_row, st, do, dst):
  """Gradients of ``chunk_forward`` (kernel body of the backward pass).

  With dA_ij = do_i . v_j on the causal mask and the state S entering the
  chunk, S' leaving it (transposed: st, st_next):

    dq = exp(G) * (do S^T) + [intra]     dk = exp(G_C - G) * (v dS'^T) + [intra]
    dv = A^T do + (k exp(G_C - G)) dS'   dS = exp(G_C) dS' + (q exp(G))^T do
    dG = q * dq - k * dk, plus rowsum(S' * dS') on the last row

  (dG is the gradient of the cumulative log decay; the caller maps it back
  to log_decay by the transpose of the cumsum.)

  Args:
    q, k, v, g, g_row, st: as in ``chunk_forward``. do: [c, V] output
      cotangent. dst: [V, K] cotangent of the state after the chunk.

  Returns:
    dq, dk [c, K]; dv [c, V]; dg [c, Kg]; the cotangent of ``st`` [V, K].
  """
  g_last = _last_row(g)
  eg, edec = jnp.exp(g), jnp.exp(g_last - g)
  kd = k * edec
  st_next = st * jnp.exp(g_last) + _mm_tn(v, kd)
  a, w = _scores(q, k, g, g_row)
  da = _mm_nt(do, v)
  if g_row is None:
    dq_in = jnp.sum(da[:, :, None] * k[None, :, :] * w, axis=1)
    dk_in = jnp.sum(da[:, :, None] * q[:, None, :] * w, axis=0)
  else:
    dae = da * w
    dq_in, dk_in = _mm(dae, k), _mm_tn(dae, q)
  dq = eg * _mm(do, st) + dq_in
  dk = edec * _mm(v, dst) + dk_in
  dv = _mm_tn(a, do) + _mm_nt(kd, dst)
  rows = lax.broadcasted_iota(jnp.int32, dq.shape, 0)
  state_term = jnp.sum(st_next * dst, axis=0, keepdims=True)
  dg = q * dq - k * dk + jnp.where(rows == dq.shape[0] - 1, state_term, 0.0)
  if g_row is not None:
    dg = jnp.sum(dg, axis=1, keepdims=True)
  dst = dst * jnp.exp(g_last) + _mm_tn(do, q * eg)
  return dq, dk, dv, dg, dst



def chunk_forward_refs(n, chunk: int, st, ins, o_ref, states_ref):
  """:func:`chunk_forward` of chunk ``n`` (rows ``n*chunk ..``) of a kernel's refs.

  ``ins``: the refs (q, k, v, g [T, .], g_row (indexed by chunk) or None);
  records the state entering the chunk in ``states_ref[n]``, writes the
  chunk's output rows of ``o_ref`` and returns the state leaving it (kernel
  body of both backends).
  """
  q, k, v, g, g_row = ins
  rows = pl.ds(n * chunk, chunk)
  states_ref[n] = st
  o, st = chunk_forward(q[rows, :].astype(jnp.float32), k[rows, :].astype(jnp.float32),
                        v[rows, :].astype(jnp.float32), g[rows, :],
                        None if g_row is None else g_row[n], st)
  o_ref[rows, :] = o.astype(o_ref.dtype)
  return st


def chunk_backward_refs(n, chunk: int, dst, ins, outs):
  """:func:`chunk_backward` of chunk ``n`` (rows ``n*chunk ..``) of a kernel's refs.

  ``ins``: the refs (q, k, v, g [T, .], g_row (indexed by chunk) or None, states
  [T/c, V, K], do [T, V]); ``outs``: (dq, dk, dv, dg) refs whose chunk rows
  it writes. Returns dS entering the chunk (kernel body of both backends).
  """
  q, k, v, g, g_row, states, do = ins
  rows = pl.ds(n * chunk, chunk)
  grads = chunk_backward(q[rows, :].astype(jnp.float32), k[rows, :].astype(jnp.float32),
                         v[rows, :].astype(jnp.float32), g[rows, :],
                         None if g_row is None else g_row[n], states[n],
                         do[rows, :].astype(jnp.float32), dst)
  for out, value in zip(outs, grads[:4]):
    out[rows, :] = value
  return grads[4]


def unit_lower_inverse(at: Array) -> Array:
  """(I + A)^{-1} for strictly lower-triangular A, given At = A^T [C, C].

  Forward substitution, one row per step, written with masks and
  reductions only (no dynamic slicing, no small matmuls), so that the same
  code runs in XLA, Mosaic TPU and Triton. Row i of the inverse is
  e_i - sum_{j<i} A_ij T_j; rows not yet computed are still identity rows
  and meet A_ij = 0.
  """
  n = at.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  col = lax.broadcasted_iota(jnp.int32, (1, n), 1)
  eye = (rows == cols).astype(at.dtype)

  def body(i, t):
    a_i = jnp.sum(jnp.where(cols == i, at, 0.0), axis=1, keepdims=True)
    new = jnp.where(col == i, 1.0, 0.0) - jnp.sum(a_i * t, axis=0,
                                                  keepdims=True)
    return jnp.where(rows == i, new, t)

  return lax.fori_loop(0, n, body, eye)


def delta_chunk_forward(q, k, v, beta, beta_row, g, g_row, st):
  """One chunk of the (gated) delta rule on 2-D float32 tiles (kernel body).

  UT / WY form (Yang et al. 2024, "Parallelizing Linear Transformers with the
  Delta Rule over Sequence Length"; gated: "Gated Delta Networks"). With
  u_t = beta_t (v_t - exp(g_t) k_t S_{t-1}) the state inside the chunk is
  S_t = exp(G_t) S + sum_{j<=t} exp(G_t - G_j) k_j^T u_j, and the u solve
  (I + A) u = beta (v - exp(G) k S) with A_ij = beta_i exp(G_i - G_j) k_i.k_j
  (j < i). With T = (I + A)^{-1}:  u = T (beta v) - T (beta exp(G) k) S.

  Args:
    q, k: [C, K]; v: [C, V]; beta, g: [C, 1]; beta_row, g_row: the same as
      [1, C]; st: [V, K] transposed state entering the chunk.

  Returns:
    o [C, V] and the transposed state after the chunk [V, K].
  """
  kk = _mm_nt(k, k)
  # A^T: At[j, i] = beta_i exp(G_i - G_j) k_i.k_j for i > j.
  n = kk.shape[0]
  upper = (lax.broadcasted_iota(jnp.int32, (n, n), 1)
           > lax.broadcasted_iota(jnp.int32, (n, n), 0))
  at = kk * beta_row * _masked_exp(g_row - g, upper)
  t = unit_lower_inverse(at)
  eg = jnp.exp(g)
  w = _mm(t, k * (beta * eg))
  u = _mm(t, v * beta) - _mm_nt(w, st)
  o = _mm_nt(q * eg, st) + _mm(_mm_nt(q, k) * decay_matrix(g, g_row), u)
  g_last = _last_row(g)
  st = st * jnp.exp(g_last) + _mm_tn(u, k * jnp.exp(g_last - g))
  return o, st


# ------------------------------------------------------- linear attention (XLA)


def as_decay(log_decay: Optional[Array], q: Array) -> Array:
  """log_decay None / [B, T, H] / [B, T, H, K] -> [B, T, H, Kg] (Kg = 1 or K)."""
  if log_decay is None:
    return jnp.zeros(q.shape[:3] + (1,), acc_dtype(q))
  return log_decay[..., None] if log_decay.ndim == 3 else log_decay


def linear_attention_steps(q, k, v, log_decay=None, initial_state=None):
  """Step-by-step recurrence (specification): S_t = diag(exp(g_t)) S_{t-1}
  + k_t^T v_t, o_t = q_t S_t.

  Args:
    q, k: [B, T, H, K]. v: [B, T, H, V]. log_decay: None, [B, T, H] or
      [B, T, H, K]. initial_state: None or [B, H, K, V].

  Returns:
    o [B, T, H, V] (dtype of q, k, v) and the final state [B, H, K, V].
  """
  g = as_decay(log_decay, q)
  acc = acc_dtype(q, k, v, g, initial_state)
  bsz, _, h, kd = q.shape
  s0 = (jnp.zeros((bsz, h, kd, v.shape[-1]), acc) if initial_state is None
        else initial_state.astype(acc))

  def step(s, x):
    qt, kt, vt, gt = (y.astype(acc) for y in x)
    s = jnp.exp(gt)[..., None] * s + kt[..., :, None] * vt[..., None, :]
    return s, jnp.einsum("bhk,bhkv->bhv", qt, s)

  s, o = lax.scan(step, s0, tuple(_time_major(x) for x in (q, k, v, g)))
  return _time_major(o).astype(jnp.result_type(q, k, v)), s


def linear_attention_quadratic(q, k, v, log_decay=None, initial_state=None):
  """The parallel (quadratic) form over the whole sequence, in log space.

  o_i = (q_i * exp(G_i)) S_0 + sum_{j<=i} (sum_d q_id k_jd exp(G_id - G_jd)) v_j
  with G the cumulative log decay from the start. O(T^2 K) memory: a
  reference for short sequences only.
  """
  g = as_decay(log_decay, q)
  acc = acc_dtype(q, k, v, g, initial_state)
  q, k, v, g = (jnp.moveaxis(x.astype(acc), 2, 1) for x in (q, k, v, g))
  gc = jnp.cumsum(g, axis=2)                                   # [B, H, T, Kg]
  w = _masked_exp(gc[:, :, :, None, :] - gc[:, :, None, :, :],
                  _causal(q.shape[2])[..., None])             # [B, H, T, T, Kg]
  a = jnp.einsum("bhid,bhjd,bhijd->bhij", q, k,
                 jnp.broadcast_to(w, w.shape[:-1] + (q.shape[-1],)))
  o = jnp.einsum("bhij,bhjv->bhiv", a, v)
  kdec = k * jnp.exp(gc[:, :, -1:] - gc)
  s = jnp.einsum("bhtk,bhtv->bhkv", kdec, v)
  if initial_state is not None:
    s0 = initial_state.astype(acc)
    o = o + jnp.einsum("bhtk,bhkv->bhtv", q * jnp.exp(gc), s0)
    s = s + jnp.exp(gc[:, :, -1])[..., None] * s0
  return jnp.moveaxis(o, 1, 2).astype(jnp.result_type(q, k, v)), s


def _to_chunks(x: Array, chunk: int, dtype) -> Array:
  """[B, T, H, F] -> [B, H, T // chunk, chunk, F]."""
  bsz, t, h, f = x.shape
  x = x.astype(dtype).reshape(bsz, t // chunk, chunk, h, f)
  return jnp.transpose(x, (0, 3, 1, 2, 4))


def _from_chunks(x: Array) -> Array:
  """[B, H, N, C, F] -> [B, N * C, H, F]."""
  bsz, h, n, c, f = x.shape
  return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(bsz, n * c, h, f)


# Largest |G_i - G_r| (r: a chunk's middle row) for which the per-key scores
# are one matmul: exp(60) ~ 1e26 stays far from float32 overflow, exp(-60)
# far from its subnormals.
ONE_MATMUL_SPAN = 60.0


def _scores_one_matmul(q, k, g):
  """Per-key scores through the chunk's middle row r, as one matmul:
  (q_i * exp(G_i - G_r)) . (k_j * exp(G_r - G_j)), masked to j <= i. Exact,
  and finite while every |G - G_r| <= ``ONE_MATMUL_SPAN``; G_r carries no
  gradient (the product does not depend on it)."""
  g_ref = lax.stop_gradient(g[..., g.shape[-2] // 2:g.shape[-2] // 2 + 1, :])
  scores = jnp.einsum("...ik,...jk->...ij", q * jnp.exp(g - g_ref),
                      k * jnp.exp(g_ref - g))
  return jnp.where(_causal(q.shape[-2]), scores, 0.0)


def _scores_halving(q, k, g):
  """Per-key scores by recursive halving, safe for any decay.

  The diagonal is q_i . k_i; every other pair j < i lies in the lower-left
  b x b block of exactly one aligned 2b-block (b = C/2, ..., 1), where
  exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j) with r the block's middle
  row, both exponents <= 0: one batched matmul of decayed q and k per level.
  log2(C) levels of about C K exps each, no [C, C, K] tensor. A chunk that
  is not a power of 2 is padded (zero q, k; G repeated, so exponents stay
  <= 0) and cropped.
  """
  *lead, c, _ = q.shape
  cp = next_pow2(c)
  if cp != c:
    widths = [(0, 0)] * len(lead) + [(0, cp - c), (0, 0)]
    q, k = jnp.pad(q, widths), jnp.pad(k, widths)
    g = jnp.pad(g, widths, mode="edge")
  out = jnp.einsum("...ik,...ik->...i", q, k)[..., None] * jnp.eye(cp, dtype=q.dtype)
  lower_left = jnp.array([[0, 0], [1, 0]], q.dtype)
  b = cp // 2
  while b:
    p = cp // (2 * b)
    qs, ks, gs = (x.reshape(*lead, p, 2, b, x.shape[-1]) for x in (q, k, g))
    g_mid = gs[..., 1, :1, :]
    scores = jnp.einsum("...pik,...pjk->...pij",
                        qs[..., 1, :, :] * jnp.exp(gs[..., 1, :, :] - g_mid),
                        ks[..., 0, :, :] * jnp.exp(g_mid - gs[..., 0, :, :]))
    out = out + jnp.einsum("...pij,pq,uv->...puiqvj", scores,
                           jnp.eye(p, dtype=q.dtype), lower_left).reshape(out.shape)
    b //= 2
  return out[..., :c, :c]


def _one_matmul_ok(g: Array) -> Array:
  """Whether every |G - G_r| <= ``ONE_MATMUL_SPAN`` (r: each chunk's middle row)."""
  mid = g.shape[-2] // 2
  return jnp.max(jnp.abs(g - g[..., mid:mid + 1, :])) <= ONE_MATMUL_SPAN


@jax.custom_vjp
def _per_key_scores(q, k, g):
  """``_scores_one_matmul`` where ``_one_matmul_ok``, else ``_scores_halving``.

  A ``lax.cond`` on the whole batch in the forward pass and another in the
  custom VJP (which recomputes the chosen branch's forward), so only one
  branch runs either way (both under vmap); differentiating through one
  cond would carry both branches' residuals.
  """
  return lax.cond(_one_matmul_ok(g), _scores_one_matmul, _scores_halving,
                  q, k, g)


def _per_key_scores_fwd(q, k, g):
  ok = _one_matmul_ok(g)
  return (lax.cond(ok, _scores_one_matmul, _scores_halving, q, k, g),
          (q, k, g, ok))


def _per_key_scores_bwd(res, ct):
  q, k, g, ok = res

  def vjp(scores):
    return lambda *args: jax.vjp(scores, *args[:3])[1](args[3])

  return lax.cond(ok, vjp(_scores_one_matmul), vjp(_scores_halving),
                  q, k, g, ct)


_per_key_scores.defvjp(_per_key_scores_fwd, _per_key_scores_bwd)


def _intra_scores(q, k, g):
  """Causal decay-weighted scores [..., C, C] of every chunk.

  Per-head decay: (q k^T) * exp(G_i - G_j). Per-key decay: one matmul
  through each chunk's middle row (``_scores_one_matmul``) when the decay
  spans at most ``ONE_MATMUL_SPAN`` around it in every chunk of the batch
  (weak and moderate decays, e.g. up to one reset per chunk), else recursive
  halving (``_scores_halving``: strong decays); see ``_per_key_scores``.
  """
  if g.shape[-1] == 1:
    return (jnp.einsum("...ik,...jk->...ij", q, k)
            * decay_matrix(g, jnp.swapaxes(g, -1, -2)))
  return _per_key_scores(q, k, g)


def _chunk_states(decay: Array, local: Array, s0: Array) -> tuple[Array, Array]:
  """States entering each chunk: S_{n+1} = decay_n * S_n + local_n.

  Args:
    decay: [B, H, N, K or 1, 1 or V]. local: [B, H, N, K, V]. s0: [B, H, K, V].

  Returns:
    the entering states [B, H, N, K, V] and the final state [B, H, K, V].
  """
  def step(s, x):
    return x[0] * s + x[1], s

  s, entering = lax.scan(step, s0, (jnp.moveaxis(decay, 2, 0),
                                    jnp.moveaxis(local, 2, 0)))
  return jnp.moveaxis(entering, 0, 2), s


def linear_attention_chunked(q, k, v, log_decay, initial_state, *, chunk: int):
  """The chunked algorithm (XLA path of ``chunked_linear_attention``).

  Every chunk's local state k~^T v and its causal scores are computed in
  parallel; a ``lax.scan`` over the T / C chunks passes the [K, V] state;
  the outputs are then (q exp(G)) S_enter + A v, again in parallel.

  Args:
    q, k, v, log_decay, initial_state: as ``linear_attention_steps``, with T
      a multiple of ``chunk`` and initial_state given.
    chunk: C.

  Returns:
    o [B, T, H, V] and the final state [B, H, K, V] (accumulation dtype).
  """
  g = as_decay(log_decay, q)
  acc = acc_dtype(q, k, v, g, initial_state)
  qc, kc, vc, gc = (_to_chunks(x, chunk, acc) for x in (q, k, v, g))
  gc = jnp.cumsum(gc, axis=-2)
  g_last = gc[..., -1:, :]
  local = jnp.einsum("...ck,...cv->...kv", kc * jnp.exp(g_last - gc), vc)
  decay = jnp.swapaxes(jnp.exp(g_last), -1, -2)                # [.., Kg, 1]
  entering, s = _chunk_states(decay, local, initial_state.astype(acc))
  a = _intra_scores(qc, kc, gc)
  o = (jnp.einsum("...ck,...kv->...cv", qc * jnp.exp(gc), entering)
       + jnp.einsum("...ij,...jv->...iv", a, vc))
  return _from_chunks(o).astype(jnp.result_type(q, k, v)), s


# ------------------------------------------------------------ delta rule (XLA)


def delta_rule_steps(q, k, v, beta, log_decay=None, initial_state=None):
  """Step-by-step (gated) delta rule (specification).

  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
  o_t = q_t S_t. beta in [0, 2] gives the transition eigenvalues in [-1, 1]
  for unit-norm keys (Grazzi et al. 2024, "Unlocking State-Tracking in Linear
  RNNs Through Negative Eigenvalues").

  Args:
    q, k: [B, T, H, K]. v: [B, T, H, V]. beta: [B, T, H]. log_decay: None or
      [B, T, H]. initial_state: None or [B, H, K, V].
  """
  g = as_decay(log_decay, q)[..., 0]
  acc = acc_dtype(q, k, v, beta, g, initial_state)
  bsz, _, h, kd = q.shape
  s0 = (jnp.zeros((bsz, h, kd, v.shape[-1]), acc) if initial_state is None
        else initial_state.astype(acc))

  def step(s, x):
    qt, kt, vt, bt, gt = (y.astype(acc) for y in x)
    ks = jnp.einsum("bhk,bhkv->bhv", kt, s)
    s = jnp.exp(gt)[..., None, None] * (
        s - bt[..., None, None] * kt[..., :, None] * ks[..., None, :])
    s = s + bt[..., None, None] * kt[..., :, None] * vt[..., None, :]
    return s, jnp.einsum("bhk,bhkv->bhv", qt, s)

  s, o = lax.scan(step, s0, tuple(_time_major(x) for x in (q, k, v, beta, g)))
  return _time_major(o).astype(jnp.result_type(q, k, v)), s


def _substitute(m: Array, b: Array, lower: bool) -> Array:
  """Solves (I + M) x = b for strictly triangular M [..., C, C], b [..., C, F],
  one row at a time (row i of M meets only the rows of x already solved)."""
  n = m.shape[-1]

  def body(step, x):
    i = step if lower else n - 1 - step
    row = lax.dynamic_index_in_dim(m, i, axis=-2, keepdims=False)
    xi = (lax.dynamic_index_in_dim(b, i, axis=-2, keepdims=False)
          - jnp.einsum("...c,...cf->...f", row, x))
    return lax.dynamic_update_index_in_dim(x, xi, i, axis=-2)

  return lax.fori_loop(0, n, body, jnp.zeros_like(b))


@jax.custom_vjp
def unit_lower_solve(a: Array, b: Array) -> Array:
  """x = (I + A)^{-1} b for strictly lower-triangular A [..., C, C], b [..., C, F].

  Forward substitution in plain XLA ops rather than
  ``lax.linalg.triangular_solve``: jaxlib 0.10's CPU LAPACK trsm hands its
  batch to XLA:CPU's intra-op thread pool and blocks until done, which
  deadlocks once every pool thread is inside such a solve (it hung DeltaNet
  training on a 2-core machine). The VJP is the transposed substitution:
  db = (I + A)^{-T} g, dA = -tril(db x^T, -1).
  """
  return _substitute(a, b, lower=True)


def _unit_lower_solve_fwd(a, b):
  x = _substitute(a, b, lower=True)
  return x, (a, x)


def _unit_lower_solve_bwd(res, g):
  a, x = res
  db = _substitute(jnp.swapaxes(a, -1, -2), g, lower=False)
  da = -jnp.einsum("...if,...jf->...ij", db, x)
  return jnp.where(_causal(a.shape[-1], strict=True), da, 0.0), db


unit_lower_solve.defvjp(_unit_lower_solve_fwd, _unit_lower_solve_bwd)


def delta_rule_chunked(q, k, v, beta, log_decay, initial_state, *, chunk: int):
  """Chunked (gated) delta rule, UT form (XLA path of ``delta_rule``).

  In parallel over chunks: A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i) and
  the two unit-lower-triangular solves W = (I + A)^{-1} (beta exp(G) k),
  U = (I + A)^{-1} (beta v) (``unit_lower_solve``). Sequentially over chunks
  (``lax.scan``): u = U - W S, S' = exp(G_C) S + (k exp(G_C - G))^T u. Then in
  parallel o = (q exp(G)) S + ((q k^T) * exp(G_i - G_j)) u.

  Args: as ``delta_rule_steps`` with T a multiple of ``chunk`` and
    initial_state given.
  """
  g = as_decay(log_decay, q)
  acc = acc_dtype(q, k, v, beta, g, initial_state)
  qc, kc, vc, gc, bc = (_to_chunks(x, chunk, acc)
                        for x in (q, k, v, g, beta[..., None]))
  gc = jnp.cumsum(gc, axis=-2)                                 # [B, H, N, C, 1]
  g_row = jnp.swapaxes(gc, -1, -2)
  kk = jnp.einsum("...ik,...jk->...ij", kc, kc)
  a = bc * kk * decay_matrix(gc, g_row, strict=True)
  rhs = jnp.concatenate([kc * bc * jnp.exp(gc), vc * bc], axis=-1)
  x = unit_lower_solve(a, rhs)
  w, u_pre = x[..., :k.shape[-1]], x[..., k.shape[-1]:]
  g_last = gc[..., -1:, :]
  kdec = kc * jnp.exp(g_last - gc)

  def step(s, xs):
    w_n, u_n, kd_n, d_n = xs
    u = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
    return d_n * s + jnp.einsum("bhck,bhcv->bhkv", kd_n, u), (s, u)

  s, (entering, u) = lax.scan(
      step, initial_state.astype(acc),
      tuple(jnp.moveaxis(y, 2, 0) for y in (w, u_pre, kdec, jnp.exp(g_last))))
  entering, u = jnp.moveaxis(entering, 0, 2), jnp.moveaxis(u, 0, 2)
  scores = (jnp.einsum("...ik,...jk->...ij", qc, kc)
            * decay_matrix(gc, g_row))
  o = (jnp.einsum("...ck,...kv->...cv", qc * jnp.exp(gc), entering)
       + jnp.einsum("...ij,...jv->...iv", scores, u))
  return _from_chunks(o).astype(jnp.result_type(q, k, v)), s
