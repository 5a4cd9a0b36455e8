"""ops.scan.chunked_linear_attention and ops.scan.delta_rule.

Every path (XLA chunked, Triton kernels (interpreted on CPU), TPU kernels
under pltpu.InterpretParams) against the step-by-step recurrence in float64,
forward and all gradients (dq, dk, dv, dlog_decay, dbeta, dinitial_state), on
ragged T (1, 63, 100), head dims 60 and 128, per-head and per-key decays,
weak (~0.95 per step) and strong (down to e^-6 per step, which underflows
any exp(-G) factorisation) decays, beta in [0, 2]. Also: the quadratic
reference, two halves with the state passed = the whole, vmap / jit, bf16,
race detection on two simulated cores, TPU / CUDA cross-lowering, errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ops import scan
from ops.scan import reference as ref
from tests.helpers import cross_lower, races_found
from tests.numerics import TOL, assert_rel_close
from tests.ops.test_scan import assert_vjp_matches, cotangents, float64_vjp, random

ATTN_NAMES = ("o", "state", "dq", "dk", "dv", "dlog_decay", "dinitial_state")
DELTA_NAMES = ("o", "state", "dq", "dk", "dv", "dbeta", "dlog_decay",
               "dinitial_state")
DECAYS = {"weak": (0.0, 0.05), "strong": (1.0, 6.0)}


def _attn_inputs(rng, shape, decay, dtype=jnp.float32):
  """q, k, v, log_decay, initial_state for shape = (B, T, H, K, V).

  decay: None, or (kind, strength) with kind "head" ([B, T, H]) or "key"
  ([B, T, H, K]).
  """
  b, t, h, kd, vd = shape
  q, k = random(rng, (b, t, h, kd), dtype), random(rng, (b, t, h, kd), dtype)
  v = random(rng, (b, t, h, vd), dtype)
  s0 = random(rng, (b, h, kd, vd))
  if decay is None:
    return q, k, v, s0
  kind, strength = decay
  low, high = DECAYS[strength]
  g = -random(rng, (b, t, h) + ((kd,) if kind == "key" else ()),
              low=low, high=high)
  return q, k, v, g, s0


def _attn_fn(**kw):
  def fn(q, k, v, *rest):
    *g, s0 = rest
    return scan.chunked_linear_attention(q, k, v, *g, initial_state=s0, **kw)
  return fn


def _attn_reference(q, k, v, *rest):
  *g, s0 = rest
  return ref.linear_attention_steps(q, k, v, *g, initial_state=s0)


def _check_attn(shape, decay, dtype=jnp.float32, seed=0, **kw):
  rng = np.random.default_rng(seed)
  args = _attn_inputs(rng, shape, decay, dtype)
  fn = _attn_fn(**kw)
  names = ATTN_NAMES if decay else ATTN_NAMES[:5] + ATTN_NAMES[6:]
  assert_vjp_matches(fn, _attn_reference, args, cotangents(rng, fn, args),
                     names, TOL[jnp.dtype(dtype).name])


# ------------------------------------------------------ chunked_linear_attention


@pytest.mark.parametrize("kind", [pytest.param("head", marks=pytest.mark.slow),
                                  "key"])
def test_quadratic_reference_is_the_recurrence(kind):
  rng = np.random.default_rng(0)
  args = _attn_inputs(rng, (2, 23, 2, 5, 4), (kind, "strong"))
  cts = (np.zeros((2, 23, 2, 4)), np.zeros((2, 2, 5, 4)))
  steps = float64_vjp(_attn_reference, args, cts)[0]
  quad = float64_vjp(
      lambda q, k, v, g, s0: ref.linear_attention_quadratic(q, k, v, g, s0),
      args, cts)[0]
  for got, want in zip(quad, steps):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,decay", [
    ((1, 1, 2, 60, 60), ("head", "weak")),
    ((2, 63, 2, 128, 60), ("key", "strong")),
    ((1, 100, 2, 60, 128), ("head", "strong")),
    pytest.param((1, 100, 1, 60, 40), None, marks=pytest.mark.slow),
    ((1, 63, 2, 60, 40), ("key", "weak")),
], ids=str)
def test_attention_xla_matches_float64(shape, decay):
  _check_attn(shape, decay, impl="xla")


@pytest.mark.parametrize("resets,one_matmul", [((20,), True),
                                               ((10, 20, 80), False)])
def test_attention_xla_per_key_branches(resets, one_matmul):
  """Per-key scores: one matmul while the decay spans <= ONE_MATMUL_SPAN
  around each chunk's middle (weak decay plus one reset of -30 per chunk),
  recursive halving beyond (two resets in a chunk); both match float64."""
  rng = np.random.default_rng(6)
  q, k, v, g, s0 = _attn_inputs(rng, (1, 100, 2, 60, 40), ("key", "weak"))
  g = g.at[:, list(resets)].add(-30.0)
  chunks = jnp.cumsum(jnp.pad(g, ((0, 0), (0, 28), (0, 0), (0, 0))).reshape(
      1, 2, 64, 2, 60), axis=2)
  assert bool(ref._one_matmul_ok(jnp.moveaxis(chunks, 2, -2))) == one_matmul
  args = (q, k, v, g, s0)
  fn = _attn_fn(impl="xla")
  assert_vjp_matches(fn, _attn_reference, args, cotangents(rng, fn, args),
                     ATTN_NAMES, TOL["float32"])


def test_attention_xla_chunk_not_a_power_of_two():
  """chunk 24: the per-key scores pad each chunk to 32 and crop."""
  _check_attn((1, 63, 1, 60, 40), ("key", "strong"), impl="xla", chunk_size=24)


@pytest.mark.parametrize("decay", [("head", "strong"), ("key", "strong")],
                         ids=str)
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_attention_kernels_match_float64(impl, decay):
  """chunk 32 over T = 100: 4 chunks carry the state (per-key: 2 sub-chunks
  of 16 per chunk); K = 60 and V = 40 are padded (GPU) or full-dim (TPU)."""
  _check_attn((1, 100, 2, 60, 40), decay, impl=impl, chunk_size=32)


@pytest.mark.slow
@pytest.mark.pallas_gpu
def test_attention_gpu_kernel_head_dim_128_weak_decay():
  _check_attn((1, 63, 1, 128, 128), ("key", "weak"), impl="pallas_gpu",
              chunk_size=32)


@pytest.mark.parametrize("impl,decay", [
    pytest.param("xla", ("head", "weak"), marks=pytest.mark.slow),
    ("pallas_gpu", ("key", "weak"))])
def test_attention_bfloat16(impl, decay):
  rng = np.random.default_rng(3)
  args = _attn_inputs(rng, (1, 63, 2, 60, 40), decay, jnp.bfloat16)
  out = jax.eval_shape(_attn_fn(impl=impl), *args)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
  _check_attn((1, 63, 2, 60, 40), decay, jnp.bfloat16, seed=3, impl=impl,
              chunk_size=32)


def _assert_halves_equal_whole(fn, args, split):
  """fn(args[:, :split]) then fn(args[:, split:]) from its state = fn(args)."""
  *seq, s0 = args
  o, s = fn(*seq, s0)
  o1, s1 = fn(*(x[:, :split] for x in seq), s0)
  o2, s2 = fn(*(x[:, split:] for x in seq), s1)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "o")
  assert_rel_close(s2, s, 1e-5, "state")


@pytest.mark.parametrize("impl,decay", [
    ("xla", ("key", "strong")),
    pytest.param("pallas_gpu", ("head", "weak"), marks=pytest.mark.slow)])
def test_attention_in_pieces(impl, decay):
  rng = np.random.default_rng(4)
  _assert_halves_equal_whole(_attn_fn(impl=impl, chunk_size=32),
                             _attn_inputs(rng, (1, 100, 2, 60, 40), decay), 37)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_attention_vmap_jit(impl):
  rng = np.random.default_rng(5)
  """The XLA case also covers log_decay=None (no decay)."""
  decay = ("head", "weak") if impl == "pallas_gpu" else None
  args = [x[None].repeat(3, 0) * jnp.arange(1, 4).reshape((3,) + (1,) * x.ndim)
          for x in _attn_inputs(rng, (1, 40, 2, 60, 40), decay)]
  if decay:
    args[3] = -jnp.abs(args[3])
  fn = _attn_fn(impl=impl, chunk_size=16)
  o, s = jax.jit(jax.vmap(fn))(*args)
  for i in range(3):
    oi, si = fn(*(x[i] for x in args))
    assert_rel_close(o[i], oi, 1e-6, "o")
    assert_rel_close(s[i], si, 1e-6, "state")


@pytest.mark.pallas_tpu
def test_attention_tpu_kernels_race_free_on_two_cores():
  """Batch, head and V-tile axes are 'parallel' (split over two simulated
  cores); the sequence axis carries the state (forward) and its cotangent
  (backward, walked in reverse) in VMEM."""
  rng = np.random.default_rng(6)
  args = _attn_inputs(rng, (2, 40, 2, 60, 40), ("key", "strong"))
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  fn = _attn_fn(impl="pallas_tpu", interpret=params, chunk_size=16)
  out, vjp = jax.vjp(fn, *args)
  jax.block_until_ready(out)
  assert not races_found()
  cts = cotangents(rng, fn, args)
  grads = jax.block_until_ready(vjp(cts))
  assert not races_found()
  want_out, want_grads = float64_vjp(_attn_reference, args, cts)
  for got, want, name in zip(list(out) + list(grads), want_out + want_grads,
                             ATTN_NAMES):
    assert_rel_close(got, want, TOL["float32"], name)


# -------------------------------------------------------------------- delta rule


def _delta_inputs(rng, shape, gated, dtype=jnp.float32):
  """q, k (unit rows), v, beta in [0, 2], log_decay, initial_state."""
  b, t, h, kd, vd = shape
  q, v = random(rng, (b, t, h, kd), dtype), random(rng, (b, t, h, vd), dtype)
  k = random(rng, (b, t, h, kd))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  beta = random(rng, (b, t, h), dtype, low=0.0, high=2.0)
  g = -random(rng, (b, t, h), low=0.0, high=0.5 if gated == "gated" else 4.0)
  return q, k, v, beta, g, random(rng, (b, h, kd, vd))


def _delta_fn(**kw):
  def fn(q, k, v, beta, g, s0):
    return scan.delta_rule(q, k, v, beta, g, initial_state=s0, **kw)
  return fn


def _delta_reference(q, k, v, beta, g, s0):
  return ref.delta_rule_steps(q, k, v, beta, g, s0)


def _check_delta(shape, gated, dtype=jnp.float32, seed=0, **kw):
  rng = np.random.default_rng(seed)
  args = _delta_inputs(rng, shape, gated, dtype)
  fn = _delta_fn(**kw)
  assert_vjp_matches(fn, _delta_reference, args, cotangents(rng, fn, args),
                     DELTA_NAMES, TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("shape,gated", [
    ((1, 1, 2, 60, 60), "gated"),
    ((2, 63, 2, 128, 60), "gated"),
    pytest.param((1, 100, 2, 60, 128), "strongly_gated",
                 marks=pytest.mark.slow),
], ids=str)
def test_delta_xla_matches_float64(shape, gated):
  _check_delta(shape, gated, impl="xla")


@pytest.mark.slow
def test_delta_without_decay_matches_float64():
  rng = np.random.default_rng(1)
  q, k, v, beta, _, s0 = _delta_inputs(rng, (1, 63, 2, 60, 40), "gated")
  fn = lambda q, k, v, beta, s0: scan.delta_rule(q, k, v, beta,
                                                  initial_state=s0, impl="xla")
  reference = lambda q, k, v, beta, s0: ref.delta_rule_steps(q, k, v, beta,
                                                             None, s0)
  args = (q, k, v, beta, s0)
  assert_vjp_matches(fn, reference, args, cotangents(rng, fn, args),
                     DELTA_NAMES[:6] + DELTA_NAMES[7:], TOL["float32"])


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_delta_kernels_match_float64(impl):
  """Forward kernel over 4 chunks of 32 (T = 100); gradients come from the
  XLA chunked algorithm behind the kernel's custom_vjp."""
  _check_delta((1, 100, 2, 60, 40), "gated", impl=impl, chunk_size=32)


@pytest.mark.slow
def test_delta_bfloat16():
  _check_delta((1, 63, 2, 60, 40), "gated", jnp.bfloat16, seed=2, impl="xla",
               chunk_size=32)


def test_delta_negative_eigenvalues_flip_the_state():
  """beta = 2 with a unit key reflects the state along k: two steps with the
  same key give back the state (eigenvalue -1, squared)."""
  rng = np.random.default_rng(3)
  k = random(rng, (1, 1, 1, 8))
  k = jnp.repeat(k / jnp.linalg.norm(k), 2, axis=1)
  s0 = random(rng, (1, 1, 8, 4))
  zeros = jnp.zeros((1, 2, 1, 4))
  _, s1 = scan.delta_rule(k[:, :1], k[:, :1], zeros[:, :1],
                          jnp.full((1, 1, 1), 2.0), initial_state=s0)
  _, s2 = scan.delta_rule(k, k, zeros, jnp.full((1, 2, 1), 2.0),
                          initial_state=s0)
  kk = np.asarray(k[0, 0, 0], np.float64)
  reflect = np.eye(8) - 2 * np.outer(kk, kk)
  np.testing.assert_allclose(s1[0, 0], reflect @ np.asarray(s0[0, 0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s2, s0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [
    "xla", pytest.param("pallas_gpu", marks=pytest.mark.slow)])
def test_delta_in_pieces(impl):
  rng = np.random.default_rng(4)
  _assert_halves_equal_whole(_delta_fn(impl=impl, chunk_size=32),
                             _delta_inputs(rng, (1, 100, 2, 60, 40), "gated"),
                             37)


@pytest.mark.slow
@pytest.mark.pallas_gpu
def test_delta_vmap_jit():
  rng = np.random.default_rng(5)
  args = [x[None].repeat(2, 0) for x in
          _delta_inputs(rng, (1, 40, 2, 60, 40), "gated")]
  args[2] = args[2] * jnp.asarray([1.0, -2.0]).reshape(2, 1, 1, 1, 1)
  fn = _delta_fn(impl="pallas_gpu", chunk_size=16)
  o, s = jax.jit(jax.vmap(fn))(*args)
  for i in range(2):
    oi, si = fn(*(x[i] for x in args))
    assert_rel_close(o[i], oi, 1e-6, "o")
    assert_rel_close(s[i], si, 1e-6, "state")


@pytest.mark.pallas_tpu
def test_delta_tpu_kernel_race_free_on_two_cores():
  rng = np.random.default_rng(6)
  args = _delta_inputs(rng, (2, 40, 2, 60, 40), "gated")
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  o, s = _delta_fn(impl="pallas_tpu", interpret=params, chunk_size=16)(*args)
  jax.block_until_ready((o, s))
  assert not races_found()
  want_o, want_s = float64_vjp(
      _delta_reference, args,
      (np.zeros(o.shape), np.zeros(s.shape)))[0]
  assert_rel_close(o, want_o, TOL["float32"], "o")
  assert_rel_close(s, want_s, TOL["float32"], "state")


# ---------------------------------------------------------- lowering and errors


@pytest.mark.parametrize("platform,impl", [("tpu", "pallas_tpu"),
                                           ("cuda", "pallas_gpu")])
@pytest.mark.parametrize("op,dtype", [("head", jnp.float32),
                                      ("key", jnp.bfloat16),
                                      ("delta", jnp.bfloat16)], ids=str)
def test_chunked_cross_lowers(platform, impl, op, dtype):
  b, t, h, kd, vd = 2, 200, 2, 128, 128
  q = jax.ShapeDtypeStruct((b, t, h, kd), dtype)
  v = jax.ShapeDtypeStruct((b, t, h, vd), dtype)
  per_head = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  if op == "delta":
    fn = lambda q, k, v, g: scan.delta_rule(q, k, v, jnp.exp(g), g, impl=impl,
                                            interpret=False)
    g = per_head
  else:
    fn = functools.partial(scan.chunked_linear_attention, impl=impl,
                           interpret=False)
    g = q if op == "key" else per_head

  def loss(q, k, v, g):
    o, s = fn(q, k, v, g)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  grads = jax.grad(loss, (0, 1, 2, 3))
  if op == "delta":   # its custom_vjp takes the gradients (and their forward) from XLA
    cross_lower(platform, fn, q, q, v, g)
    cross_lower(platform, grads, q, q, v, g, expect_kernel=False)
  else:
    cross_lower(platform, grads, q, q, v, g)


def test_vmap_of_tpu_kernels_cross_lowers():
  """vmap adds a grid axis; TPU interpret mode cannot run that in jax 0.10.2
  (PALLAS_NOTES section 6), the Mosaic lowering can."""
  q = jax.ShapeDtypeStruct((3, 1, 64, 2, 128), jnp.float32)
  g = jax.ShapeDtypeStruct((3, 1, 64, 2), jnp.float32)
  attend = jax.vmap(lambda q, k, v, g: scan.chunked_linear_attention(
      q, k, v, g, impl="pallas_tpu", interpret=False)[0])
  delta = jax.vmap(lambda q, k, v, g: scan.delta_rule(
      q, k, v, jnp.exp(g), g, impl="pallas_tpu", interpret=False)[0])
  cross_lower("tpu", jax.grad(lambda *x: jnp.sum(attend(*x)), (0, 1, 2, 3)), q, q, q, g)
  cross_lower("tpu", delta, q, q, q, g)   # delta's gradients are XLA's (its custom_vjp)
  cross_lower("tpu", jax.grad(lambda *x: jnp.sum(delta(*x)), (0, 1, 2, 3)), q, q, q, g,
              expect_kernel=False)


def test_chunked_auto_is_xla_on_cpu():
  rng = np.random.default_rng(7)
  q, k, v, g, s0 = _attn_inputs(rng, (1, 20, 1, 8, 8), ("head", "weak"))
  auto = scan.chunked_linear_attention(q, k, v, g, initial_state=s0)
  xla = scan.chunked_linear_attention(q, k, v, g, initial_state=s0, impl="xla")
  np.testing.assert_array_equal(np.asarray(auto[0]), np.asarray(xla[0]))


_Q = np.ones((2, 10, 3, 8), np.float32)
_V = np.ones((2, 10, 3, 6), np.float32)


@pytest.mark.parametrize("change,match", [
    (dict(q=_Q[0]), "q must have shape"),
    (dict(k=_Q[:, :9]), "k must have the shape of q"),
    (dict(v=_V[:, :9]), "v must have shape"),
    (dict(q=_Q.astype(np.int32), k=_Q.astype(np.int32)), "q must have dtype"),
    (dict(q=_Q[:, :0], k=_Q[:, :0], v=_V[:, :0]), "at least one time step"),
    (dict(log_decay=np.zeros((2, 10, 4))), "log_decay must have shape"),
    (dict(log_decay=np.zeros((2, 10, 3, 7))), "log_decay \\[B, T, H, K\\]"),
    (dict(initial_state=np.zeros((2, 3, 6, 8))), "initial_state must have"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
    (dict(chunk_size=True), "chunk_size must be an int"),
    (dict(chunk_size=12, impl="pallas_tpu"), "multiple of 8"),
    (dict(chunk_size=24, impl="pallas_gpu"), "power of 2 >= 16"),
    (dict(impl="pallas_tpu", block_sizes=scan.ChunkBlockSizes(64)),
     "block_v for pallas_tpu"),
    (dict(impl="pallas_tpu", block_sizes=scan.ChunkBlockSizes(6, 4)),
     "sub_chunk for pallas_tpu"),
    (dict(impl="pallas_gpu", block_sizes=scan.ChunkBlockSizes(24)),
     "powers of 2 >= 16"),
    (dict(impl="fast"), "impl must be one of"),
])
def test_attention_errors(change, match):
  args = dict(q=_Q, k=_Q, v=_V)
  args.update(change)
  q, k, v = (jnp.asarray(args.pop(n)) for n in ("q", "k", "v"))
  args = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x
          for n, x in args.items()}
  with pytest.raises(ValueError, match=match):
    scan.chunked_linear_attention(q, k, v, **args)


@pytest.mark.parametrize("change,match", [
    (dict(beta=None), "beta must be an array"),
    (dict(beta=np.ones((2, 10, 3, 1))), "beta must have shape"),
    (dict(log_decay=np.zeros((2, 10, 3, 8))), "log_decay must have shape"),
    (dict(chunk_size=-4), "chunk_size must be an int >= 1"),
])
def test_delta_errors(change, match):
  args = dict(beta=np.ones((2, 10, 3), np.float32))
  args.update(change)
  args = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x
          for n, x in args.items()}
  beta = args.pop("beta")
  with pytest.raises(ValueError, match=match):
    scan.delta_rule(jnp.asarray(_Q), jnp.asarray(_Q), jnp.asarray(_V), beta,
                    **args)
