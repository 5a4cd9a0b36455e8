"""ops.scan.linear_scan: every path against a float64 recurrence.

XLA paths (sequential and associative) and both kernels (on CPU: Triton
interpreted, Mosaic TPU under pltpu.InterpretParams, whose NaN-filled
uninitialised memory poisons any output a kernel forgets to write) are
compared, forward and all gradients, with the step-by-step recurrence run in
float64 (itself checked against a NumPy loop). Also: resets (a = 0), pieces
with the state passed on, vmap / jit, bf16, race detection on two simulated
cores, cross-lowering for TPU and CUDA, and input validation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ops import scan
from ops.scan import reference as ref
from tests.helpers import cross_lower, races_found
from tests.numerics import TOL, assert_rel_close

SCAN_PATHS = {
    "xla_sequential": dict(impl="xla", xla_method="sequential"),
    "xla_associative": dict(impl="xla", xla_method="associative"),
    "pallas_gpu": dict(impl="pallas_gpu",
                       block_sizes=scan.ScanBlockSizes(block_t=4, block_d=128)),
    "pallas_tpu": dict(impl="pallas_tpu",
                       block_sizes=scan.ScanBlockSizes(block_t=16, block_d=128)),
}


# ------------------------------------------------------------ shared helpers


def random(rng, shape, dtype=jnp.float32, low=None, high=None):
  """Normal (or uniform in [low, high]) values, rounded to ``dtype``."""
  x = (rng.standard_normal(shape) if low is None
       else rng.uniform(low, high, shape))
  return jnp.asarray(x, dtype)


def float64_vjp(fn, args, cts):
  """Outputs of ``fn`` and the cotangents of ``args``, in float64."""

  @jax.jit
  def run(args, cts):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cts)

  with jax.enable_x64(True):
    out, grads = run([jnp.asarray(np.asarray(x, np.float64)) for x in args],
                     tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cts))
    return [np.asarray(o) for o in out], [np.asarray(g) for g in grads]


def cotangents(rng, fn, args):
  """Random cotangents for the outputs of ``fn``, in the outputs' dtypes."""
  return tuple(random(rng, o.shape, o.dtype)
               for o in jax.eval_shape(fn, *args))


def assert_vjp_matches(fn, reference, args, cts, names, tol):
  """fn's outputs and gradients (wrt all ``args``) vs the float64 reference."""
  out, vjp = jax.vjp(fn, *args)
  grads = vjp(cts)
  want_out, want_grads = float64_vjp(reference, args, cts)
  for got, want, name in zip(list(out) + list(grads), want_out + want_grads,
                             names):
    assert got.shape == want.shape, name
    assert_rel_close(got, want, tol, name)


# ----------------------------------------------------------------- linear_scan

SCAN_NAMES = ("h", "h_last", "da", "db", "dh0")


def _scan_inputs(rng, shape, dtype=jnp.float32):
  a = np.asarray(rng.uniform(0.5, 1.0, shape))
  a[:, ::11] = 0.0                                 # resets (document starts)
  return (jnp.asarray(a, dtype), random(rng, shape, dtype),
          random(rng, (shape[0], shape[2]), dtype))


def test_sequential_reference_is_the_recurrence():
  rng = np.random.default_rng(0)
  a, b, h0 = (np.asarray(x, np.float64) for x in _scan_inputs(rng, (2, 13, 5)))
  with jax.enable_x64(True):
    h, h_last = ref.linear_scan_sequential(*(jnp.asarray(x) for x in (a, b, h0)))
    hr, _ = ref.linear_scan_sequential(*(jnp.asarray(x) for x in (a, b, h0)),
                                       reverse=True)
  want, state = np.empty_like(b), h0.copy()
  for t in range(b.shape[1]):
    state = a[:, t] * state + b[:, t]
    want[:, t] = state
  np.testing.assert_allclose(h, want, rtol=1e-13)
  np.testing.assert_allclose(h_last, want[:, -1], rtol=1e-13)
  state = h0.copy()
  for t in reversed(range(b.shape[1])):
    state = a[:, t] * state + b[:, t]
    want[:, t] = state
  np.testing.assert_allclose(hr, want, rtol=1e-13)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("path", list(SCAN_PATHS))
def test_linear_scan_matches_float64(path, reverse):
  """T = 37 and D = 200 are ragged for every tile; the kernels get several
  T blocks (carry) and two D tiles."""
  rng = np.random.default_rng(1)
  args = _scan_inputs(rng, (2, 37, 200))

  def fn(a, b, h0):
    return scan.linear_scan(a, b, h0=h0, reverse=reverse, **SCAN_PATHS[path])

  def reference(a, b, h0):
    return ref.linear_scan_sequential(a, b, h0, reverse)

  assert_vjp_matches(fn, reference, args, cotangents(rng, fn, args),
                     SCAN_NAMES, TOL["float32"])


@pytest.mark.parametrize("shape", [(1, 1, 60), (2, 63, 128), (1, 100, 60)],
                         ids=str)
@pytest.mark.parametrize("path", ["xla_sequential", "pallas_gpu"])
def test_linear_scan_shapes(path, shape):
  rng = np.random.default_rng(2)
  args = _scan_inputs(rng, shape)
  fn = lambda a, b, h0: scan.linear_scan(a, b, h0=h0, **SCAN_PATHS[path])
  assert_vjp_matches(fn, ref.linear_scan_sequential, args,
                     cotangents(rng, fn, args), SCAN_NAMES, TOL["float32"])


@pytest.mark.parametrize("path", ["xla_sequential", "pallas_gpu"])
def test_linear_scan_bfloat16(path):
  rng = np.random.default_rng(3)
  args = _scan_inputs(rng, (2, 37, 200), jnp.bfloat16)
  fn = lambda a, b, h0: scan.linear_scan(a, b, h0=h0, **SCAN_PATHS[path])
  out = jax.eval_shape(fn, *args)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
  assert_vjp_matches(fn, ref.linear_scan_sequential, args,
                     cotangents(rng, fn, args), SCAN_NAMES, TOL["bfloat16"])


@pytest.mark.parametrize("path,reverse", [("xla_associative", True),
                                          ("pallas_gpu", False)])
def test_linear_scan_in_pieces(path, reverse):
  """Two pieces with the state passed on give the whole sequence."""
  rng = np.random.default_rng(4)
  a, b, h0 = _scan_inputs(rng, (2, 50, 60))
  run = lambda a, b, h0: scan.linear_scan(a, b, h0=h0, reverse=reverse,
                                          **SCAN_PATHS[path])
  h, h_last = run(a, b, h0)
  first, second = (slice(30, None), slice(None, 30)) if reverse else (
      slice(None, 30), slice(30, None))
  h1, mid = run(a[:, first], b[:, first], h0)
  h2, end = run(a[:, second], b[:, second], mid)
  pieces = jnp.concatenate([h2, h1] if reverse else [h1, h2], axis=1)
  assert_rel_close(pieces, h, 1e-6, "h")
  assert_rel_close(end, h_last, 1e-6, "h_last")


@pytest.mark.parametrize("path", ["xla_sequential", "pallas_gpu"])
def test_linear_scan_vmap_jit(path):
  rng = np.random.default_rng(5)
  a = random(rng, (3, 2, 20, 60), low=0.5, high=1.0)
  b, h0 = random(rng, (3, 2, 20, 60)), random(rng, (3, 2, 60))
  run = lambda a, b, h0: scan.linear_scan(a, b, h0=h0, **SCAN_PATHS[path])
  h, h_last = jax.jit(jax.vmap(run))(a, b, h0)
  for i in range(3):
    hi, li = run(a[i], b[i], h0[i])
    assert_rel_close(h[i], hi, 1e-6, "h")
    assert_rel_close(h_last[i], li, 1e-6, "h_last")


@pytest.mark.pallas_tpu
def test_linear_scan_tpu_kernel_race_free_on_two_cores():
  """Batch and D tiles are 'parallel' (split over two simulated cores), the
  time blocks 'arbitrary' with the carry in VMEM."""
  rng = np.random.default_rng(6)
  a, b, h0 = _scan_inputs(rng, (2, 37, 200))
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  h, h_last = scan.linear_scan(a, b, h0=h0, impl="pallas_tpu",
                               interpret=params,
                               block_sizes=scan.ScanBlockSizes(8, 128))
  assert not races_found()
  want, want_last = float64_vjp(ref.linear_scan_sequential, (a, b, h0),
                                (np.zeros(a.shape), np.zeros(h0.shape)))[0]
  assert_rel_close(h, want, TOL["float32"], "h")
  assert_rel_close(h_last, want_last, TOL["float32"], "h_last")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform,impl", [("tpu", "pallas_tpu"),
                                           ("cuda", "pallas_gpu")])
def test_linear_scan_cross_lowers(platform, impl, dtype):
  x = jax.ShapeDtypeStruct((2, 300, 200), dtype)

  def loss(a, b):
    h, h_last = scan.linear_scan(a, b, impl=impl, interpret=False)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last)

  cross_lower(platform, jax.grad(loss, (0, 1)), x, x)


def test_linear_scan_auto_is_xla_on_cpu():
  rng = np.random.default_rng(7)
  a, b, h0 = _scan_inputs(rng, (1, 9, 8))
  auto = scan.linear_scan(a, b, h0=h0)
  xla = scan.linear_scan(a, b, h0=h0, impl="xla")
  np.testing.assert_array_equal(np.asarray(auto[0]), np.asarray(xla[0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=np.ones((2, 3)), b=np.ones((2, 3))), "a must have shape"),
    (dict(a=np.ones((2, 3, 4)), b=np.ones((2, 3, 5))), "b must have the shape"),
    (dict(a=np.ones((2, 3, 4), np.int32), b=np.ones((2, 3, 4), np.int32)),
     "a must have dtype"),
    (dict(a=np.ones((2, 0, 4)), b=np.ones((2, 0, 4))), "at least one time"),
    (dict(h0=np.ones((2, 5))), "h0 must have shape"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(xla_method="fast"), "xla_method"),
    (dict(impl="pallas_tpu", block_sizes=scan.ScanBlockSizes(12, 128)),
     "block_t % 8"),
    (dict(impl="pallas_tpu", block_sizes=scan.ScanBlockSizes(8, 64)),
     "block_d % 128"),
    (dict(impl="pallas_gpu", block_sizes=scan.ScanBlockSizes(8, 96)),
     "power of 2"),
    (dict(impl="pallas_gpu", block_sizes=scan.ScanBlockSizes(0, 64)),
     "block_t must be an int >= 1"),
])
def test_linear_scan_errors(kwargs, match):
  args = dict(a=np.ones((2, 3, 4), np.float32), b=np.ones((2, 3, 4), np.float32))
  args.update(kwargs)
  a = jnp.asarray(args.pop("a"))
  b = jnp.asarray(args.pop("b"))
  if "h0" in args:
    args["h0"] = jnp.asarray(args["h0"], jnp.float32)
  with pytest.raises(ValueError, match=match):
    scan.linear_scan(a, b, **args)
