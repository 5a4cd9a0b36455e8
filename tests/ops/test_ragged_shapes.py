"""Ragged shapes with DEFAULT block sizes: every public op x every impl.

DESIGN.md: ragged sizes (N, K, T, D not a multiple of 16/128, M = 1 or 3,
T = 1) are normal input; the op pads inside and slices the result. Each
case runs "xla", "pallas_tpu" and "pallas_gpu" (interpret mode on CPU) with
default block sizes and compares against a float64 reference; the ops with
custom VJPs also check gradients on a subset.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import attention as A
from ops import quant, scan
from ops.scan import reference as sref
from tests.helpers import cross_lower
from tests.numerics import assert_rel_close

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
RNG = np.random.default_rng(7)
TOL = 1e-4  # f32 vs float64, loose enough for interpret-mode accumulation order


def _r(shape, low=None, high=None, rng=RNG):
  if low is not None:
    return jnp.asarray(rng.uniform(low, high, shape), jnp.float32)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _f64(f, *args):
  with jax.enable_x64(True):
    out = f(*[jnp.asarray(np.asarray(a, np.float64)) for a in args])
    return jax.tree.map(np.asarray, out)


# ------------------------------------------------------------------ quant

QUANT_CASES = [  # (M-shape of x, K, N, fmt, group_size)
    ((3,), 40, 200, "int8", None),      # the reported case: N = 200
    ((1,), 72, 24, "int8", None),       # M = 1, K and N not multiples of 16
    ((2, 3), 64, 100, "int4", 32),      # N = 100, M = 6
    ((1,), 48, 72, "nf4", 16),
    ((3,), 64, 40, "fp4", 32),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: f"{c[3]}-M{c[0]}-K{c[1]}-N{c[2]}")
def test_quantized_matmul_ragged(case, impl):
  mshape, k, n, fmt, gs = case
  qw = quant.quantize(_r((k, n)), fmt, group_size=gs)
  x = _r(mshape + (k,))
  w = quant.dequantize(qw)
  y = quant.quantized_matmul(x, qw, impl=impl)
  assert y.shape == mshape + (n,)
  assert_rel_close(y, _f64(lambda x, w: x @ w, x, w), TOL, f"{fmt} {impl}")
  if fmt in ("int8", "int4"):
    g = _r(mshape + (n,))
    dx = jax.grad(lambda x: jnp.sum(quant.quantized_matmul(x, qw, impl=impl) * g))(x)
    assert_rel_close(dx, _f64(lambda g, w: g @ w.T, g, w), TOL, f"dx {fmt} {impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_w8a8_ragged(impl):
  qw = quant.quantize(_r((40, 200)), "int8")
  x = _r((3, 40))
  y = quant.quantized_matmul(x, qw, act_fmt="int8", impl=impl)
  want = quant.quantized_matmul(x, qw, act_fmt="int8", impl="xla")
  assert_rel_close(y, want, TOL, f"w8a8 {impl}")


# ------------------------------------------------------------------- scan

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 1, 5), (1, 13, 200), (3, 37, 24)], ids=str)
def test_linear_scan_ragged(shape, impl):
  a, b, h0 = _r(shape, 0.5, 1.0), _r(shape), _r((shape[0], shape[2]))
  f = lambda a, b, h0: scan.linear_scan(a, b, h0=h0, impl=impl)
  h, hl = f(a, b, h0)
  want_h, want_last = _f64(_scan64, a, b, h0)
  assert_rel_close(h, want_h, TOL, "h")
  assert_rel_close(hl, want_last, TOL, "h_last")
  if shape == (3, 37, 24):
    ga = jax.grad(lambda a: jnp.sum(f(a, b, h0)[0] ** 2))(a)
    want = _f64(jax.grad(lambda a, b, h0: jnp.sum(_scan64(a, b, h0)[0] ** 2)), a, b, h0)
    assert_rel_close(ga, want, TOL, "da")


def _scan64(a, b, h0):
  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h
  hl, hs = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
  return jnp.swapaxes(hs, 0, 1), hl


ATTN_SHAPES = [(1, 1, 2, 20, 12), (1, 37, 1, 24, 40)]  # (B, T, H, K, V)
# (shape, impl); the TPU-interpret gradients at T = 37 are the slowest cases.
ATTN_CASES = [pytest.param(sh, im, marks=pytest.mark.slow) if (sh[1] > 1 and im == "pallas_tpu")
              else (sh, im) for sh in ATTN_SHAPES for im in IMPLS]


def _loss(f):
  return lambda *a: jnp.sum(f(*a)[0] ** 2) + jnp.sum(f(*a)[1])


def _check_chunked(f, args, want_o, want_s, want, grad_names):
  """f(*args) = (o, state) against float64 (o, state) and, unless want is None, the
  gradients of the first four args (named grad_names) against ``want``."""
  o, s = f(*args)
  assert_rel_close(o, want_o, TOL, "o")
  assert_rel_close(s, want_s, TOL, "state")
  if want is not None:
    got = jax.grad(_loss(f), argnums=(0, 1, 2, 3))(*args)
    for name, x, y in zip(grad_names, got, want):
      assert_rel_close(x, y, TOL, "d" + name)


@functools.lru_cache(maxsize=None)
def _attn_case(shape):
  """Inputs and float64 (o, state, grads) of one shape, shared by the impls."""
  b, t, h, kd, vd = shape
  rng = np.random.default_rng(sum(shape))
  q, k, v = _r((b, t, h, kd), rng=rng), _r((b, t, h, kd), rng=rng), _r((b, t, h, vd), rng=rng)
  args = (q, k, v, -_r((b, t, h), 0.0, 0.5, rng), _r((b, h, kd, vd), rng=rng))
  f = sref.linear_attention_steps
  grads = _f64(jax.grad(_loss(f), argnums=(0, 1, 2, 3)), *args) if t > 1 else None
  return args, _f64(f, *args), grads


@pytest.mark.parametrize("shape,impl", ATTN_CASES, ids=str)
def test_chunked_linear_attention_ragged(shape, impl):
  args, (want_o, want_s), want = _attn_case(shape)
  f = lambda q, k, v, g, s0: scan.chunked_linear_attention(
      q, k, v, g, initial_state=s0, impl=impl)
  _check_chunked(f, args, want_o, want_s, want, ("q", "k", "v", "g"))


@functools.lru_cache(maxsize=None)
def _delta_case(shape):
  b, t, h, kd, vd = shape
  rng = np.random.default_rng(sum(shape) + 1)
  q, v, k = _r((b, t, h, kd), rng=rng), _r((b, t, h, vd), rng=rng), _r((b, t, h, kd), rng=rng)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  args = (q, k, v, _r((b, t, h), 0.0, 1.0, rng), -_r((b, t, h), 0.0, 0.5, rng),
          _r((b, h, kd, vd), rng=rng))
  f = sref.delta_rule_steps
  grads = _f64(jax.grad(_loss(f), argnums=(0, 1, 2, 3)), *args) if t > 1 else None
  return args, _f64(f, *args), grads


@pytest.mark.parametrize("shape,impl", ATTN_CASES, ids=str)
def test_delta_rule_ragged(shape, impl):
  args, (want_o, want_s), want = _delta_case(shape)
  f = lambda q, k, v, beta, g, s0: scan.delta_rule(q, k, v, beta, g, initial_state=s0, impl=impl)
  _check_chunked(f, args, want_o, want_s, want, ("q", "k", "v", "beta"))


# -------------------------------------------------------------- attention

MASK = A.LocalMask(20)


@functools.lru_cache(maxsize=None)
def _bsa_case(shape):
  b, t, s, hq, hkv, d = shape
  rng = np.random.default_rng(sum(shape))
  args = (_r((b, t, hq, d), rng=rng), _r((b, s, hkv, d), rng=rng), _r((b, s, hkv, d), rng=rng))
  w = _r((b, t, hq, d), rng=rng)
  ref = lambda q, k, v: A.attention_reference(q, k, v, MASK)
  loss = lambda q, k, v: jnp.sum(ref(q, k, v) * w.astype(q.dtype))
  grads = _f64(jax.grad(loss, argnums=(0, 1, 2)), *args) if t > 1 else None
  return args, w, _f64(ref, *args), grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 1, 24), (1, 37, 45, 2, 1, 40)], ids=str)
def test_block_sparse_attention_ragged(shape, impl):
  args, w, want_o, want = _bsa_case(shape)
  f = lambda q, k, v: A.block_sparse_attention(q, k, v, MASK, impl=impl)
  assert_rel_close(f(*args), want_o, TOL, "o")
  if want is not None:
    got = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(*args)
    for name, x, y in zip("qkv", got, want):
      assert_rel_close(x, y, TOL, "d" + name)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_block_attention_ragged(impl):
  """T = S = 37 (ragged); the TPU kernel needs the selection unit block_size
  to be a multiple of 128 (it cannot be padded without changing the
  selection), so it runs with block_size=128 and the default 64 is a
  ValueError naming block_size."""
  q, k, v = _r((1, 37, 2, 40)), _r((1, 37, 1, 40)), _r((1, 37, 1, 40))
  kw = dict(top_k=1, block_size=128) if impl == "pallas_tpu" else dict(top_k=1)
  got = A.topk_block_attention(q, k, v, impl=impl, **kw)
  want = A.topk_block_attention(q, k, v, impl="xla", **kw)
  assert got.shape == q.shape
  assert_rel_close(got, want, TOL, "o")
  if impl == "pallas_tpu":
    with pytest.raises(ValueError, match=r"block_size to be a multiple of 128.*block_size=64"):
      A.topk_block_attention(q, k, v, top_k=1, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_attention_ragged(impl):
  q, kc, vc = _r((3, 2, 40)), _r((3, 45, 1, 40)), _r((3, 45, 1, 40))
  lengths = jnp.asarray([1, 45, 30], jnp.int32)
  got = A.decode_attention(q, kc, vc, lengths, impl=impl)
  with jax.enable_x64(True):
    want = []
    for i, n in enumerate(np.asarray(lengths)):
      qf = jnp.zeros((1, n, 2, 40), jnp.float64).at[0, n - 1].set(np.asarray(q[i], np.float64))
      o = A.attention_reference(qf, jnp.asarray(np.asarray(kc[i:i + 1, :n], np.float64)),
                                jnp.asarray(np.asarray(vc[i:i + 1, :n], np.float64)), A.CausalMask())
      want.append(np.asarray(o[0, -1]))
  assert_rel_close(got, np.stack(want), TOL, "o")


S = jax.ShapeDtypeStruct
F32 = jnp.float32


def _quant_grad(k, n, fmt, gs, mshape):
  qw = quant.quantize(jnp.ones((k, n), F32), fmt, group_size=gs)
  return (lambda impl: jax.grad(lambda x, q: jnp.sum(quant.quantized_matmul(
      x, q, impl=impl, interpret=False) ** 2)), (S(mshape + (k,), F32), qw))


def _grad(f, n):
  return jax.grad(lambda *a: jnp.sum(f(*a)[0]), argnums=tuple(range(n)))


_Q, _V, _G = S((1, 37, 1, 24), F32), S((1, 37, 1, 40), F32), S((1, 37, 1), F32)
CROSS = {  # name -> (impl -> fn, avals); forward and backward where there is one
    **{f"quant_{c[3]}_K{c[1]}_N{c[2]}": _quant_grad(c[1], c[2], c[3], c[4], c[0])
       for c in QUANT_CASES[:3]},
    "linear_scan_3x37x24": (lambda impl: _grad(
        lambda a, b: scan.linear_scan(a, b, impl=impl, interpret=False), 2),
        (S((3, 37, 24), F32),) * 2),
    "linear_scan_T1_D200": (lambda impl: lambda a, b: scan.linear_scan(
        a, b, impl=impl, interpret=False), (S((1, 1, 200), F32),) * 2),
    "chunked_T37_K24_V40": (lambda impl: _grad(
        lambda q, k, v, g: scan.chunked_linear_attention(q, k, v, g, impl=impl, interpret=False),
        4), (_Q, _Q, _V, _G)),
    "delta_T37_K24_V40": (lambda impl: lambda q, k, v, b, g: scan.delta_rule(
        q, k, v, b, g, impl=impl, interpret=False), (_Q, _Q, _V, _G, _G)),
    "block_sparse_T37_S45_D40": (lambda impl: jax.grad(
        lambda q, k, v: jnp.sum(A.block_sparse_attention(q, k, v, MASK, impl=impl,
                                                         interpret=False)), argnums=(0, 1, 2)),
        (S((1, 37, 2, 40), F32), S((1, 45, 1, 40), F32), S((1, 45, 1, 40), F32))),
    "block_sparse_T1_D24": (lambda impl: lambda q, k, v: A.block_sparse_attention(
        q, k, v, impl=impl, interpret=False),
        (S((1, 1, 2, 24), F32), S((1, 1, 1, 24), F32), S((1, 1, 1, 24), F32))),
    "topk_T37_D40": (lambda impl: lambda q, k, v: A.topk_block_attention(
        q, k, v, top_k=1, block_size=128 if impl == "pallas_tpu" else 64, impl=impl,
        interpret=False), (S((1, 37, 2, 40), F32), S((1, 37, 1, 40), F32), S((1, 37, 1, 40), F32))),
    "decode_B3_S45_D40": (lambda impl: lambda q, k, v, n: A.decode_attention(
        q, k, v, n, impl=impl, interpret=False),
        (S((3, 2, 40), F32), S((3, 45, 1, 40), F32), S((3, 45, 1, 40), F32), S((3,), jnp.int32))),
}


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("name", list(CROSS))
def test_ragged_calls_cross_lower(name, impl):
  """Interpret mode ignores the Triton power-of-two and TPU (8, 128) rules;
  the padded ragged calls (with default blocks) must lower for the hardware."""
  make, avals = CROSS[name]
  cross_lower(impl, make(impl), *avals)


@pytest.mark.parametrize("fmt,k,gs,msg", [
    ("int4", 48, 24, r"group_size=24 must be a power of two in \[16, 256\]"),
    ("int8", 80, 40, r"group_size=40 must be a multiple of 16"),
])
def test_quant_gpu_group_that_cannot_tile_is_a_value_error(fmt, k, gs, msg):
  """Triton tiles are powers of two: a group that no such tile covers cannot
  be padded (the groups would shift), so pallas_gpu refuses it up front."""
  qw = quant.quantize(_r((k, 24)), fmt, group_size=gs)
  with pytest.raises(ValueError, match="impl='pallas_gpu' cannot run this call: " + msg):
    quant.quantized_matmul(_r((3, k)), qw, impl="pallas_gpu")
  quant.quantized_matmul(_r((3, k)), qw, impl="xla")  # the reference still runs it
