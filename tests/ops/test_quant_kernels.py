"""ops.quant Pallas kernels on CPU: TPU kernels in TPU interpret mode (incl. race
detection on 2 simulated cores), Triton kernels interpreted (compiled on a GPU:
tests/conftest.py), both
against a float64 dequantize-then-dot; gradients, vmap, W8A8 / LLM.int8(); and
cross-lowering for "tpu" and "cuda" (block-shape rules interpret mode ignores).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ops import quant
from tests.helpers import cross_lower, races_found
from tests.numerics import TOL, assert_rel_close
from tests.ops import test_quant_numpy as npq

K, N = 384, 256
KERNEL_VARIANTS = [
    ("int8", {}),                                     # per channel: a group spans 3 K tiles
    ("int8", dict(group_size=64)),                    # 2 groups per K tile
    ("int4", {}),                                     # G = 128
    ("int4", dict(symmetric=False, group_size=64)),   # zero points, 2 groups per tile
    ("nf4", {}),
    ("fp4", dict(double_quant=True)),
]
TPU_BLOCKS = quant.BlockSizes(block_m=64, block_n=128, block_k=128)  # >= 2 steps per axis


def _ids(v):
  return v[0] + "".join(f"-{k}={x}" for k, x in v[1].items())


@functools.lru_cache(maxsize=None)
def _qw(fmt, kw_items=(), k=K, n=N, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_t(5, size=(k, n)) * rng.uniform(0.02, 0.2, size=(1, n)) + 0.01
  return quant.quantize(jnp.asarray(w, jnp.float32), fmt, **dict(kw_items))


def _x(shape, seed=1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _ref(x, qw):
  return np.asarray(x, np.float64) @ npq.dequantize(qw)


# ----------------------------------------------------------------------------
# Numerics in interpret mode
# ----------------------------------------------------------------------------

@pytest.mark.pallas_tpu
@pytest.mark.parametrize("variant", KERNEL_VARIANTS, ids=_ids)
def test_tpu_kernel_matches_float64(variant):
  qw = _qw(variant[0], tuple(variant[1].items()))
  x = _x((130, K))      # M = 130: 3 M blocks of 64 after padding
  y = quant.quantized_matmul(x, qw, impl="pallas_tpu", block_sizes=TPU_BLOCKS)
  assert_rel_close(y, _ref(x, qw), TOL["float32"])


@pytest.mark.pallas_tpu
@pytest.mark.parametrize("fmt,m,dtype", [("int4", 1, jnp.float32), ("nf4", 3, jnp.bfloat16)])
def test_tpu_kernel_default_blocks_small_m(fmt, m, dtype):
  qw, x = _qw(fmt), _x((m, K), dtype=dtype)
  y = quant.quantized_matmul(x, qw, impl="pallas_tpu")
  assert y.dtype == dtype
  assert_rel_close(y, _ref(x, qw), TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernels_small_odd_k(impl):
  """K = 96 (not a power of two, not a multiple of 128), G = 32, N = 384."""
  qw = _qw("int4", (("group_size", 32),), k=96, n=384)
  x = _x((3, 96))
  assert_rel_close(quant.quantized_matmul(x, qw, impl=impl), _ref(x, qw), TOL["float32"])


@pytest.mark.pallas_gpu
@pytest.mark.parametrize("variant", KERNEL_VARIANTS, ids=_ids)
@pytest.mark.parametrize("m", [1, 3, 130])
def test_gpu_kernel_matches_float64(variant, m):
  qw = _qw(variant[0], tuple(variant[1].items()))
  x = _x((m, K))
  assert_rel_close(quant.quantized_matmul(x, qw, impl="pallas_gpu"), _ref(x, qw), TOL["float32"])


@pytest.mark.pallas_gpu
def test_gpu_kernel_bf16():
  qw, x = _qw("int4", (("symmetric", False), ("group_size", 64))), _x((2, 9, K), dtype=jnp.bfloat16)
  y = quant.quantized_matmul(x, qw, impl="pallas_gpu")
  assert y.shape == (2, 9, N) and y.dtype == jnp.bfloat16
  assert_rel_close(y, _ref(x, qw), TOL["bfloat16"])


@pytest.mark.parametrize("impl,variant", [
    ("pallas_tpu", ("int8", {})), ("pallas_tpu", ("int4", dict(symmetric=False, group_size=64))),
    ("pallas_gpu", ("int8", dict(group_size=64))), ("pallas_gpu", ("nf4", {})),
    ("pallas_gpu", ("int4", {})),
], ids=lambda v: v if isinstance(v, str) else _ids(v))
def test_kernel_grad_x_uses_transposed_kernel(impl, variant):
  qw = _qw(variant[0], tuple(variant[1].items()))
  x = _x((130, K))
  kw = dict(block_sizes=TPU_BLOCKS) if impl == "pallas_tpu" else {}
  loss = lambda x: jnp.sum(jnp.sin(quant.quantized_matmul(x, qw, impl=impl, **kw)))
  w64 = npq.dequantize(qw)
  x64 = np.asarray(x, np.float64)
  assert_rel_close(jax.grad(loss)(x), np.cos(x64 @ w64) @ w64.T, TOL["float32"], "dx")


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_w8a8_and_llm_int8_kernels_match_numpy(impl):
  qw = _qw("int8")
  x = np.array(_x((130, K), seed=4))
  x[:, [7, 200]] *= 12.0
  x = jnp.asarray(x)
  kw = dict(block_sizes=quant.BlockSizes(64, 128, 128)) if impl == "pallas_tpu" else {}
  y = quant.quantized_matmul(x, qw, act_fmt="int8", impl=impl, **kw)
  np.testing.assert_allclose(np.asarray(y), npq.w8a8(x, qw), rtol=1e-5, atol=1e-5)
  y = quant.quantized_matmul(x, qw, act_fmt="int8", outlier_threshold=6.0, impl=impl, **kw)
  np.testing.assert_allclose(np.asarray(y), npq.llm_int8(x, qw, 6.0), rtol=1e-5, atol=1e-5)


@pytest.mark.pallas_gpu
def test_gpu_kernel_vmap_jit_and_grad():
  """vmap over stacked weights and inputs (the batching rule adds a grid axis).

  TPU interpret mode cannot run vmapped kernels with dimension_semantics in
  jax 0.10.2 (PALLAS_NOTES §6); the TPU vmap is cross-lowered below instead.
  """
  ws = jnp.stack([jnp.asarray(np.random.default_rng(s).standard_normal((K, 128)), jnp.float32)
                  for s in range(2)])
  qws = jax.vmap(lambda w: quant.quantize(w, "nf4"))(ws)
  xs = _x((2, 3, K))
  f = jax.jit(jax.vmap(lambda q, x: quant.quantized_matmul(x, q, impl="pallas_gpu")))
  ys, gs = f(qws, xs), jax.grad(lambda xs: jnp.sum(jnp.sin(f(qws, xs))))(xs)
  for i in range(2):
    w64 = npq.dequantize(jax.tree_util.tree_map(lambda a: a[i], qws))
    x64 = np.asarray(xs[i], np.float64)
    assert_rel_close(ys[i], x64 @ w64, TOL["float32"], f"y[{i}]")
    assert_rel_close(gs[i], np.cos(x64 @ w64) @ w64.T, TOL["float32"], f"dx[{i}]")


# ----------------------------------------------------------------------------
# Race detection: every TPU kernel once, 2 simulated cores, parallel axes split
# ----------------------------------------------------------------------------

RACES = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
RACE_BLOCKS = quant.BlockSizes(block_m=32, block_n=128, block_k=128)


@pytest.mark.pallas_tpu
def test_tpu_weight_only_kernel_and_its_transpose_have_no_races():
  qw = _qw("int4", (("symmetric", False), ("group_size", 64)), k=256)
  x = _x((64, 256))
  y, vjp = jax.vjp(lambda x: quant.quantized_matmul(
      x, qw, impl="pallas_tpu", interpret=RACES, block_sizes=RACE_BLOCKS), x)
  jax.block_until_ready(y)
  assert not races_found()
  assert_rel_close(y, _ref(x, qw), TOL["float32"])
  g = _x((64, N), seed=9)
  (dx,) = vjp(g)
  jax.block_until_ready(dx)
  assert not races_found()
  assert_rel_close(dx, np.asarray(g, np.float64) @ npq.dequantize(qw).T, TOL["float32"], "dx")


@pytest.mark.pallas_tpu
def test_tpu_w8a8_kernel_has_no_races():
  qw = _qw("int8", k=256)
  x = _x((64, 256))
  y = quant.quantized_matmul(x, qw, act_fmt="int8", impl="pallas_tpu", interpret=RACES,
                             block_sizes=RACE_BLOCKS)
  jax.block_until_ready(y)
  assert not races_found()
  np.testing.assert_allclose(np.asarray(y), npq.w8a8(x, qw), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Cross-lowering (nothing runs): TPU (8, 128) rule, Triton power-of-two rule
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS, ids=_ids)
def test_cross_lowering_forward_and_backward(impl, variant):
  qw = quant.quantize(jnp.ones((1024, 2048), jnp.float32), variant[0], **variant[1])
  x = jax.ShapeDtypeStruct((4, 130, 1024), jnp.bfloat16)   # M = 520
  loss = lambda x, q: jnp.sum(quant.quantized_matmul(
      x, q, impl=impl, interpret=False).astype(jnp.float32))
  cross_lower(impl, jax.grad(loss), x, qw)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_cross_lowering_w8a8_llm_int8_and_decode(impl):
  qw = quant.quantize(jnp.ones((4096, 4096), jnp.float32), "int8")
  f = lambda x, q: quant.quantized_matmul(x, q, act_fmt="int8", outlier_threshold=6.0,
                                          impl=impl, interpret=False)
  cross_lower(impl, f, jax.ShapeDtypeStruct((130, 4096), jnp.float32), qw)
  qw4 = quant.quantize(jnp.ones((4096, 4096), jnp.float32), "int4")
  f = lambda x, q: quant.quantized_matmul(x, q, impl=impl, interpret=False)
  cross_lower(impl, f, jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16), qw4)


def test_cross_lowering_tpu_vmap_over_stacked_weights():
  qws = jax.vmap(lambda w: quant.quantize(w, "int4"))(jnp.ones((2, 512, 256), jnp.float32))
  f = jax.vmap(lambda q, x: quant.quantized_matmul(x, q, impl="pallas_tpu", interpret=False))
  cross_lower("pallas_tpu", f, qws, jax.ShapeDtypeStruct((2, 8, 512), jnp.bfloat16))


def test_cross_lowering_rejects_what_validation_would_reject():
  """A TPU block_k of 64 on K = 384 violates the (8, 128) rule: the op refuses it
  before lowering, and the raw Mosaic lowering rejects it too."""
  from ops.quant import tpu
  qw = _qw("int4", (("group_size", 64),))
  with pytest.raises(ValueError, match="block_k=64"):
    quant.quantized_matmul(_x((8, K)), qw, impl="pallas_tpu",
                           block_sizes=quant.BlockSizes(8, 128, 64))
  raw = lambda x: tpu.matmul(x, qw.values, qw.scales, None, fmt="int4", symmetric=True,
                             group_size=64, block_sizes=(8, 128, 64), interpret=False)
  with pytest.raises(Exception, match="divisible by 8 and 128"):
    cross_lower("pallas_tpu", raw, jax.ShapeDtypeStruct((8, K), jnp.float32))
