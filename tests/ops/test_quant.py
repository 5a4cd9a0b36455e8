"""ops.quant: formats (round trip, layout, nbytes), the XLA path, gradients,
vmap/jit, W8A8 / fp8 / LLM.int8() against NumPy, and input validation.

Kernels (interpret mode, races, cross-lowering) are in test_quant_kernels.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import quant
from ops.quant import reference
from tests.numerics import TOL, assert_rel_close
from tests.ops import test_quant_numpy as npq

# (fmt, quantize kwargs) covering every storage variant.
VARIANTS = [
    ("int8", {}), ("int8", dict(group_size=32)), ("int4", {}), ("int4", dict(symmetric=False)),
    ("int4", dict(group_size=32)), ("nf4", {}), ("nf4", dict(double_quant=True)), ("fp4", {}),
    ("fp4", dict(double_quant=True)), ("fp8", {}), ("ternary", {}), ("ternary", dict(group_size=384)),
]
K, N = 384, 272   # K = 3 * 128 (not a power of two), N not a multiple of 128


def _weight(k=K, n=N, seed=0):
  """Heavy-tailed weights with per-column scale spread and one all-zero column."""
  rng = np.random.default_rng(seed)
  w = rng.standard_t(5, size=(k, n)) * rng.uniform(0.02, 0.2, size=(1, n))
  w[:, 3] = 0.0
  return w.astype(np.float32)


def _x(shape, seed=1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@functools.lru_cache(maxsize=None)
def _qw(fmt, kw_items=(), seed=0, k=K, n=N):
  return quant.quantize(jnp.asarray(_weight(k, n, seed)), fmt, **dict(kw_items))


def _ids(v):
  return v[0] + "".join(f"-{k}={x}" for k, x in v[1].items())


# ----------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_dequantize_matches_numpy_decoding_of_storage(variant):
  fmt, kw = variant
  qw = _qw(fmt, tuple(kw.items()))
  np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), npq.dequantize(qw),
                             rtol=1e-6, atol=1e-7)


def _group_stat(w, g, fn):
  k, n = w.shape
  return np.repeat(fn(w.reshape(k // g, g, n), axis=1), g, axis=0)


@pytest.mark.parametrize("fmt,g", [("int8", K), ("int8", 32), ("int4", 128), ("int4", 32)])
def test_symmetric_integer_round_trip_within_half_step(fmt, g):
  w = _weight().astype(np.float64)
  qw = quant.quantize(jnp.asarray(w, jnp.float32), fmt, group_size=g)
  step = _group_stat(np.abs(w), g, np.max) / (127 if fmt == "int8" else 7)
  err = np.abs(np.asarray(quant.dequantize(qw), np.float64) - w)
  assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-8)
  assert np.all(err[:, 3] == 0)  # the zero column stays exactly zero


def test_asymmetric_int4_round_trip_within_half_step():
  w = _weight().astype(np.float64) + 0.05     # shifted: zero points matter
  qw = quant.quantize(jnp.asarray(w, jnp.float32), "int4", symmetric=False)
  lo = np.minimum(_group_stat(w, 128, np.min), 0)
  hi = np.maximum(_group_stat(w, 128, np.max), 0)
  err = np.abs(np.asarray(quant.dequantize(qw), np.float64) - w)
  assert np.all(err <= (hi - lo) / 15 / 2 * (1 + 1e-5) + 1e-8)
  z = np.asarray(qw.zeros)
  assert z.min() >= 0 and z.max() <= 15 and len(np.unique(z)) > 1
  sym = quant.dequantize(quant.quantize(jnp.asarray(w, jnp.float32), "int4"))
  assert np.linalg.norm(np.asarray(quant.dequantize(qw)) - w) < np.linalg.norm(np.asarray(sym) - w)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_table_formats_pick_the_nearest_code(fmt, double_quant):
  w = _weight().astype(np.float64)
  qw = quant.quantize(jnp.asarray(w, jnp.float32), fmt, double_quant=double_quant)
  absmax = _group_stat(np.abs(w), 64, np.max)
  v = np.divide(w, absmax, out=np.zeros_like(w), where=absmax > 0)
  table = npq.TABLES[fmt]
  chosen = np.abs(v - table[npq.codes(qw)])
  best = np.abs(v[..., None] - table).min(-1)
  assert np.all(chosen <= best + 1e-6)
  # Elementwise bound: half the widest table gap times the (decoded) absmax.
  half_gap = np.diff(np.sort(table)).max() / 2
  s = np.repeat(npq.scales(qw), 64, axis=0)
  err = np.abs(np.asarray(quant.dequantize(qw), np.float64) - w)
  assert np.all(err <= half_gap * absmax + np.abs(s - absmax) + 1e-7)


def test_double_quant_scales_close_and_smaller():
  qw1, qw2 = _qw("nf4"), _qw("nf4", (("double_quant", True),))
  s_true = np.asarray(qw1.scales, np.float64)
  s2 = np.repeat(np.asarray(qw2.scale_scales, np.float64), 256)[:s_true.size].reshape(s_true.shape)
  assert qw2.scales.dtype == jnp.int8 and qw2.scale_offset.shape == ()
  assert np.all(np.abs(npq.scales(qw2) - s_true) <= s2 / 2 * (1 + 1e-5) + 1e-8)
  assert qw2.nbytes < qw1.nbytes


def test_fp8_round_trip_relative_to_e4m3_spacing():
  w = _weight().astype(np.float64)
  qw = _qw("fp8")
  s = np.abs(w).max(0, keepdims=True) / 448
  s = np.where(s > 0, s, 1)
  err = np.abs(np.asarray(quant.dequantize(qw), np.float64) - w)
  assert np.all(err <= s * np.maximum(np.abs(w / s) * 2.0 ** -4, 2.0 ** -10) * (1 + 1e-5))
  assert qw.values.dtype == jnp.float8_e4m3fn


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_is_bitnet_absmean(per_channel):
  w = _weight().astype(np.float64)
  qw = _qw("ternary", (("group_size", K),) if per_channel else ())
  gamma = np.abs(w).mean(0, keepdims=True) if per_channel else np.abs(w).mean()
  gamma = np.where(gamma > 0, gamma, 1.0)
  q = np.clip(np.round(w / gamma), -1, 1)
  np.testing.assert_array_equal(npq.codes(qw) - 1, q)
  np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), q * gamma, rtol=1e-6, atol=1e-8)
  assert qw.scales.shape == ((1, N) if per_channel else (1, 1))


def test_axis_1_groups_along_the_second_axis():
  w = _weight(256, 96)
  qw = quant.quantize(jnp.asarray(w), "int4", group_size=32, axis=1)
  assert qw.shape == (256, 96) and qw.values.shape == (48, 256) and qw.scales.shape == (3, 256)
  np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), npq.dequantize(qw), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      np.asarray(quant.dequantize(qw)),
      np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w.T), "int4", group_size=32))).T)


def test_nbytes_counts_real_storage():
  k, n = 1024, 512
  w = jnp.asarray(_weight(k, n))
  bf16 = k * n * 2
  int4 = quant.quantize(w, "int4", group_size=128)
  assert int4.nbytes == k * n // 2 + (k // 128) * n * 4
  assert int4.nbytes <= 0.27 * bf16                       # issue target
  assert quant.quantize(w, "int4", group_size=128, symmetric=False).nbytes <= 0.27 * bf16
  assert quant.quantize(w, "int8").nbytes == k * n + n * 4
  nf4dq = quant.quantize(w, "nf4", double_quant=True)
  assert nf4dq.nbytes == k * n // 2 + k // 64 * n + 4 * (k // 64 * n // 256) + 4
  assert quant.quantize(w, "ternary").nbytes == k * n // 4 + 4
  assert quant.quantize(w, "fp8").nbytes == k * n + n * 4


def test_quantized_weight_is_a_pytree_with_static_metadata():
  qw = _qw("int4", (("symmetric", False),))
  leaves, treedef = jax.tree_util.tree_flatten(qw)
  assert len(leaves) == 3                                  # values, scales, zeros
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (again.fmt, again.shape, again.group_size, again.axis) == ("int4", (K, N), 128, 0)
  # jit sees arrays only; metadata stays static.
  out = jax.jit(lambda q: (q.nbytes, quant.dequantize(q)))(qw)
  assert out[0] == qw.nbytes
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(quant.dequantize(qw)))


def test_quantize_under_vmap_and_jit():
  ws = jnp.stack([jnp.asarray(_weight(256, 128, seed=s)) for s in range(3)])
  qws = jax.jit(jax.vmap(lambda w: quant.quantize(w, "nf4", double_quant=True)))(ws)
  assert qws.values.shape == (3, 128, 128) and qws.shape == (256, 128)
  for i in range(3):
    one = jax.tree_util.tree_map(lambda a: a[i], qws)
    np.testing.assert_allclose(np.asarray(quant.dequantize(one)),
                               np.asarray(quant.dequantize(quant.quantize(ws[i], "nf4", double_quant=True))),
                               rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# XLA path
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 65)], ids=lambda s: "x".join(map(str, s)))
def test_xla_weight_only_matches_float64(variant, lead):
  fmt, kw = variant
  qw = _qw(fmt, tuple(kw.items()))
  x = _x((*lead, K))
  y = quant.quantized_matmul(x, qw, impl="xla")
  assert y.shape == (*lead, N) and y.dtype == jnp.float32
  assert_rel_close(y, np.asarray(x, np.float64) @ npq.dequantize(qw), TOL["float32"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_xla_half_precision_inputs(dtype):
  qw = _qw("int4")
  x = _x((130, K), dtype=dtype)
  y = quant.quantized_matmul(x, qw)
  assert y.dtype == dtype
  assert_rel_close(y, np.asarray(x, np.float64) @ npq.dequantize(qw), TOL["bfloat16"])


def test_auto_is_xla_on_cpu():
  qw, x = _qw("int4"), _x((3, K))
  np.testing.assert_array_equal(np.asarray(quant.quantized_matmul(x, qw)),
                                np.asarray(quant.quantized_matmul(x, qw, impl="xla")))


@pytest.mark.parametrize("variant", [("int8", {}), ("int4", dict(group_size=K)),
                                     ("int4", dict(group_size=K, symmetric=False)),
                                     ("ternary", {}), ("ternary", dict(group_size=K))], ids=_ids)
def test_w8a8_matches_numpy(variant):
  fmt, kw = variant
  qw = _qw(fmt, tuple(kw.items()))
  x = _x((130, K))
  y = quant.quantized_matmul(x, qw, act_fmt="int8", impl="xla")
  np.testing.assert_allclose(np.asarray(y), npq.w8a8(x, qw), rtol=1e-5, atol=1e-5)
  assert_rel_close(y, np.asarray(x, np.float64) @ npq.dequantize(qw), 2e-2, "W8A8 vs float")


def test_fp8_activations_match_numpy():
  qw, x = _qw("fp8"), _x((130, K))
  y = quant.quantized_matmul(x, qw, act_fmt="fp8", impl="xla")
  np.testing.assert_allclose(np.asarray(y), npq.fp8_act(x, qw), rtol=1e-5, atol=1e-5)
  assert_rel_close(y, np.asarray(x, np.float64) @ npq.dequantize(qw), 6e-2, "fp8 vs float")


def _outlier_x(m=130, k=K, seed=3):
  x = np.array(_x((m, k), seed=seed))
  x[:, [5, 77, 300]] *= 12.0          # systematic outlier features, as in LLM.int8()
  return jnp.asarray(x)


def test_llm_int8_matches_numpy_and_beats_plain_w8a8():
  qw, x = _qw("int8"), _outlier_x()
  y = quant.quantized_matmul(x, qw, act_fmt="int8", outlier_threshold=6.0, impl="xla")
  np.testing.assert_allclose(np.asarray(y), npq.llm_int8(x, qw, 6.0), rtol=1e-5, atol=1e-5)
  ref = np.asarray(x, np.float64) @ npq.dequantize(qw)
  plain = quant.quantized_matmul(x, qw, act_fmt="int8", impl="xla")
  err = lambda a: np.linalg.norm(np.asarray(a, np.float64) - ref)
  assert err(y) < 0.5 * err(plain)


# ----------------------------------------------------------------------------
# Gradients, vmap, jit (XLA path; kernels in test_quant_kernels.py)
# ----------------------------------------------------------------------------

def _loss(y):
  return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("variant", [("int4", dict(symmetric=False)), ("nf4", dict(double_quant=True)),
                                     ("fp8", {}), ("ternary", {})], ids=_ids)
def test_grad_x_matches_reference_and_weight_gets_none(variant):
  fmt, kw = variant
  qw, x = _qw(fmt, tuple(kw.items())), _x((2, 3, K))
  gx, gq = jax.grad(lambda x, q: _loss(quant.quantized_matmul(x, q, impl="xla")),
                    argnums=(0, 1), allow_int=True)(x, qw)
  w64 = npq.dequantize(qw)
  x64 = np.asarray(x, np.float64)
  assert_rel_close(gx, np.cos(x64 @ w64) @ w64.T, TOL["float32"], "dx vs float64")
  ref = jax.grad(lambda x: _loss(x @ reference.dequantize(qw)))(x)
  assert_rel_close(gx, ref, TOL["float32"], "dx vs jax.grad of reference")
  for leaf in jax.tree_util.tree_leaves(gq):
    if leaf.dtype == jax.dtypes.float0:
      continue
    assert not np.any(np.asarray(leaf, np.float32)), "float leaves of qw get zero gradient"
  assert gq.values.dtype == (jnp.float8_e4m3fn if fmt == "fp8" else jax.dtypes.float0)


def test_grad_with_activation_quant_is_straight_through():
  qw, x = _qw("int8"), _outlier_x(m=7)
  for kw in (dict(act_fmt="int8"), dict(act_fmt="int8", outlier_threshold=6.0)):
    g = jax.grad(lambda x: jnp.sum(quant.quantized_matmul(x, qw, impl="xla", **kw) ** 2 / 2))(x)
    y = np.asarray(quant.quantized_matmul(x, qw, impl="xla", **kw), np.float64)
    assert_rel_close(g, y @ npq.dequantize(qw).T, TOL["float32"], f"STE dx {kw}")


def test_vmap_over_stacked_weights_and_inputs_and_grad():
  ws = jnp.stack([jnp.asarray(_weight(K, 128, seed=s)) for s in range(3)])
  qws = jax.vmap(lambda w: quant.quantize(w, "int4"))(ws)
  xs = _x((3, 5, K))
  f = jax.jit(jax.vmap(lambda q, x: quant.quantized_matmul(x, q, impl="xla")))
  ys = f(qws, xs)
  gs = jax.grad(lambda xs: _loss(f(qws, xs)))(xs)
  for i in range(3):
    w64 = npq.dequantize(jax.tree_util.tree_map(lambda a: a[i], qws))
    x64 = np.asarray(xs[i], np.float64)
    assert_rel_close(ys[i], x64 @ w64, TOL["float32"], f"vmap y[{i}]")
    assert_rel_close(gs[i], np.cos(x64 @ w64) @ w64.T, TOL["float32"], f"vmap dx[{i}]")
  # vmap over x only (shared weight), inside jit.
  qw = _qw("nf4")
  y = jax.jit(jax.vmap(lambda x: quant.quantized_matmul(x, qw, act_fmt=None)))(xs)
  assert_rel_close(y, np.asarray(xs, np.float64) @ npq.dequantize(qw), TOL["float32"])


# ----------------------------------------------------------------------------
# Validation: ValueError naming the argument, raised before anything compiles
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda w: quant.quantize(w, "int3"), "fmt"),
    (lambda w: quant.quantize(w, "int4", group_size=100), "group_size=100"),
    (lambda w: quant.quantize(w, "nf4", group_size=3), "group_size=3"),
    (lambda w: quant.quantize(w, "int4", group_size=1.5), "group_size"),
    (lambda w: quant.quantize(w[0], "int8"), "w must have shape"),
    (lambda w: quant.quantize(w.astype(jnp.int32), "int8"), "w must have dtype"),
    (lambda w: quant.quantize(w, "int8", axis=2), "axis"),
    (lambda w: quant.quantize(w, "nf4", symmetric=False), "symmetric"),
    (lambda w: quant.quantize(w, "int8", double_quant=True), "double_quant"),
    (lambda w: quant.dequantize(w), "qw must be a QuantizedWeight"),
    (lambda w: quant.dequantize(_qw("int8"), jnp.int32), "dtype"),
])
def test_bad_quantize_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((K, N), jnp.float32))


@pytest.mark.parametrize("kwargs,x_shape,match", [
    (dict(), (3, K + 1), "x must have shape"),
    (dict(act_fmt="int4"), (3, K), "act_fmt"),
    (dict(act_fmt="int8", fmt="nf4"), (3, K), "act_fmt='int8' needs weights"),
    (dict(act_fmt="fp8", fmt="int8"), (3, K), "act_fmt='fp8' needs weights"),
    (dict(act_fmt="int8", fmt="int4"), (3, K), "one weight scale per output channel"),
    (dict(outlier_threshold=6.0), (3, K), "outlier_threshold"),
    (dict(act_fmt="int8", fmt="int8", outlier_threshold=-1.0), (3, K), "outlier_threshold"),
    (dict(impl="cuda"), (3, K), "impl"),
    (dict(impl="pallas_tpu", fmt="fp8"), (3, K), "fmt='fp8' has no pallas_tpu kernel"),
    (dict(impl="pallas_gpu", fmt="ternary"), (3, K), "fmt='ternary' has no pallas_gpu kernel"),
    (dict(impl="pallas_gpu", fmt="int4", act_fmt="fp8"), (3, K), "act_fmt='fp8' needs"),
    (dict(impl="pallas_tpu", block_sizes=quant.BlockSizes(8, 100, 128)), (3, K), "block_n=100"),
    (dict(impl="pallas_tpu", block_sizes=quant.BlockSizes(8, 16, 128)), (3, K), "block_n=16"),
    (dict(impl="pallas_gpu", block_sizes=quant.BlockSizes(16, 16, 64)), (3, K), "block_k=64 must equal"),
    (dict(impl="pallas_gpu", block_sizes=quant.BlockSizes(24, 16, 128)), (3, K), "block_m=24"),
    (dict(block_sizes=(8, 128, 128)), (3, K), "block_sizes must be a BlockSizes"),
])
def test_bad_matmul_inputs(kwargs, x_shape, match):
  kwargs = dict(kwargs)
  qw = _qw(kwargs.pop("fmt", "int4"))
  with pytest.raises(ValueError, match=match):
    quant.quantized_matmul(_x(x_shape), qw, **kwargs)


def test_bad_matmul_x_dtype_and_stacked_weight():
  qw = _qw("int4")
  with pytest.raises(ValueError, match="x must have dtype"):
    quant.quantized_matmul(jnp.ones((3, K), jnp.int32), qw)
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), qw)
  with pytest.raises(ValueError, match="must be vmapped"):
    quant.quantized_matmul(_x((3, K)), stacked)
