"""models.layers.Dense with quantized weights: forward and x-gradient vs a float64
reference of the dequantized weight, NNX state (not trainable, sharding names),
jit through split/merge, per-layer impl, and errors that leave the layer unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers
from ops import quant
from tests.numerics import TOL, assert_rel_close

K, N = 384, 72   # K = 3 * 128, N not a multiple of 128

# (fmt, Dense.quantize kwargs): every storage variant the layer must carry.
VARIANTS = [
    ("int8", {}), ("int4", {}), ("int4", dict(group_size=64, symmetric=False)),
    ("nf4", dict(double_quant=True)), ("fp4", dict(group_size=128)), ("fp8", {}),
    ("ternary", {}), ("int8", dict(act_fmt="int8")),
    ("int8", dict(act_fmt="int8", outlier_threshold=2.0)), ("fp8", dict(act_fmt="fp8")),
]


def _ids(v):
  return v[0] + "".join(f"-{k}={x}" for k, x in v[1].items())


def _dense(seed=0, **kw):
  return layers.Dense(K, N, rngs=nnx.Rngs(seed), names=("embed", "mlp"), **kw)


def _x(shape=(2, 5, K), seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _np_act_quant(x):
  """Per-token int8 absmax quantization (float64), as W8A8 defines it."""
  s = np.abs(x).max(-1, keepdims=True) / 127.0
  return np.clip(np.round(x / s), -127, 127) * s


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_forward_matches_float64_reference_of_dequantized_weight(variant):
  fmt, kw = variant
  d = _dense()
  w = np.asarray(d.kernel[...], np.float64)
  d.quantize(fmt, **kw)
  assert d.is_quantized and d.kernel is None
  w_hat = np.asarray(quant.dequantize(d.quantized_weight()), np.float64)
  x = _x()
  y = np.asarray(d(x))
  assert y.shape == (2, 5, N) and np.all(np.isfinite(y))
  x64 = np.asarray(x, np.float64)
  if kw.get("act_fmt") == "int8":
    out = np.abs(x64.reshape(-1, K)).max(0) >= kw.get("outlier_threshold", np.inf)
    ref = np.where(out, x64, 0) @ w_hat + _np_act_quant(np.where(out, 0, x64)) @ w_hat
    assert 0 < out.sum() < K if "outlier_threshold" in kw else True
    assert_rel_close(y, ref, 1e-5)
  elif kw.get("act_fmt") == "fp8":
    assert_rel_close(y, x64 @ w_hat, 5e-2)   # e4m3 activations: 3 mantissa bits
  else:
    assert_rel_close(y, x64 @ w_hat, TOL["float32"])
  # ... and close to the float layer, within the format's weight error.
  tol = {"int8": 2e-2, "fp8": 6e-2, "ternary": 0.8}.get(fmt, 0.2)
  assert_rel_close(y, x64 @ w, tol)


def test_gradient_reaches_x_through_the_dequantized_weight_not_the_storage():
  d = _dense()
  d.quantize("int4", group_size=128)
  w_hat = np.asarray(quant.dequantize(d.quantized_weight()), np.float64)
  x = _x((3, K))
  g = jax.random.normal(jax.random.key(2), (3, N))
  dx = jax.grad(lambda x: jnp.sum(d(x) * g))(x)
  assert_rel_close(dx, np.asarray(g, np.float64) @ w_hat.T, TOL["float32"])
  # nnx.grad (Params by default) has nothing to differentiate; over all state, the
  # storage gets zero (float leaves) or float0 (integer codes) cotangents.
  assert not jax.tree.leaves(nnx.grad(lambda m: jnp.sum(m(x) * g))(d))
  grads = nnx.grad(lambda m: jnp.sum(m(x) * g), argnums=nnx.DiffState(0, ...),
                   allow_int=True)(d)
  for leaf in jax.tree.leaves(grads):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert not np.any(np.asarray(leaf))


def test_quantized_state_is_frozen_and_sharded_like_the_kernel():
  d = _dense(use_bias=True)
  d.quantize("nf4", double_quant=True)
  assert set(nnx.to_pure_dict(nnx.state(d, nnx.Param))) == {"bias"}   # optimizer sees only bias
  q = nnx.state(d, layers.QuantizedKernel)["quantized"]
  assert set(q) == {"values", "scales", "scale_scales", "scale_offset"}
  names = {k: v.get_metadata()["out_sharding"] for k, v in q.items()}
  assert names == {"values": ("embed", "mlp"), "scales": (None, "mlp"),
                   "scale_scales": (None,), "scale_offset": ()}
  assert q["values"][...].dtype == jnp.int8 and q["values"][...].shape == (K // 2, N)


def test_jit_through_split_merge_and_eval_shape():
  d = _dense()
  d.quantize("int4", group_size=64, symmetric=False)
  graphdef, state = nnx.split(d)
  x = _x()
  y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(d(x)))

  def build():
    m = _dense()
    m.quantize("int4", group_size=64, symmetric=False)
    return m
  abstract = nnx.eval_shape(build)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(d))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(abstract)) == want


def test_impl_act_fmt_and_threshold_are_per_layer_attributes():
  d = layers.Dense(K, 64, rngs=nnx.Rngs(0))   # the Triton kernel tiles N by powers of two
  d.quantize("int8")
  x = _x((3, K))
  y_xla = np.asarray(d(x))
  d.impl = "pallas_gpu"                       # Triton kernel, interpret mode on CPU
  assert_rel_close(d(x), y_xla.astype(np.float64), TOL["float32"])
  d.impl, d.act_fmt = "xla", "int8"           # now W8A8
  assert_rel_close(d(x), np.asarray(x, np.float64) @ np.asarray(
      quant.dequantize(d.quantized_weight()), np.float64), 3e-2)


def test_bf16_compute_dtype():
  d = _dense(dtype=jnp.bfloat16)
  d.quantize("int8")
  y = d(_x())
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(_x(), np.float64) @ np.asarray(quant.dequantize(d.quantized_weight()))
  assert_rel_close(np.asarray(y, np.float32), ref, TOL["bfloat16"])


@pytest.mark.parametrize("fmt,kw,match", [
    ("int4", dict(group_size=100), "group_size=100"),
    ("int4", dict(act_fmt="int8"), "act_fmt='int8' needs one weight scale per output channel"),
    ("nf4", dict(outlier_threshold=6.0), "outlier_threshold .* needs act_fmt='int8'"),
    ("int5", {}, "fmt must be one of"),
    ("int8", dict(impl="cuda"), "impl"),
])
def test_bad_settings_raise_before_the_layer_changes(fmt, kw, match):
  d = _dense()
  with pytest.raises(ValueError, match=match):
    d.quantize(fmt, **kw)
  assert not d.is_quantized and isinstance(d.kernel, nnx.Param)
  d.quantize("int8")
  with pytest.raises(ValueError, match="already quantized"):
    d.quantize("int8")
