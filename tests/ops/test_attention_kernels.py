"""Pallas attention kernels: interpret mode vs float64, race detection, cross-lowering.

Triton kernels run interpreted on CPU (``interpret`` left at None, so that
they compile on a GPU: tests/conftest.py); TPU kernels under
``pltpu.InterpretParams`` (few, small cases: it simulates every DMA).
Cross-lowering (``jax.export`` for ``tpu`` / ``cuda``) checks the hardware
lowering rules that interpret mode ignores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ops import attention as A
from tests.helpers import cross_lower, races_found
from tests.numerics import TOL, assert_rel_close
from tests.ops.test_attention import (RNG, _value_and_vjp, check, decode_reference, qkv,
                                      reference64, sorted_segments)

SEG = sorted_segments(1, 70, 3)
GPU_CASES = {
    # awkward: T not a multiple of the block, GQA 4/2, segments, softcap
    "causal_local_seg_softcap": ((1, 70, 70, 4, 2, 64), A.CausalMask() & A.LocalMask(20),
                                 dict(block_q=32, block_kv=32, segment_ids=SEG, softcap=4.0)),
    # S != T (more query than kv blocks), MQA 8/1, head dim 128, segment-id pair,
    # per-head dense mask | chunked
    "mqa_d128_dense_chunked_seg": (
        (1, 90, 40, 8, 1, 128), A.DenseMask(RNG.random((8, 90, 40)) < 0.1) | A.ChunkedMask(16),
        dict(block_q=16, block_kv=32,
             segment_ids=(sorted_segments(1, 90, 2), sorted_segments(1, 40, 2)))),
    # T = 1, head dim 80 (zero-padded to 128 inside), global tokens, bf16
    "t1_d80_bf16": ((2, 1, 50, 2, 1, 80), A.LocalMask(3) | A.GlobalTokensMask(1),
                    dict(block_q=16, block_kv=16, dtype=jnp.bfloat16)),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.pallas_gpu
def test_triton_kernel(name):
  shape, mask, kw = GPU_CASES[name]
  kw = dict(kw)
  q, k, v = qkv(*shape, dtype=kw.pop("dtype", jnp.float32))
  check(q, k, v, mask, impl="pallas_gpu", **kw)


@pytest.mark.pallas_tpu
def test_tpu_kernel_detect_races(capfd):
  """Forward, dq and dk/dv kernels on 2 simulated cores: correct and race-free."""
  q, k, v = qkv(1, 200, 300, 2, 1, 64)
  segs = (sorted_segments(1, 200, 2), sorted_segments(1, 300, 2))
  mask = A.ShiftedGroupMask(64) | A.DenseMask(RNG.random((200, 300)) < 0.05)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  check(q, k, v, mask, impl="pallas_tpu", interpret=params, block_q=64, block_kv=128,
        segment_ids=segs, softcap=3.0)
  assert not races_found()
  assert "RACE DETECTED" not in capfd.readouterr().out


@pytest.mark.pallas_tpu
def test_tpu_kernel_gqa_short_query():
  # T = 8 (one query block), Hq = 8 with Hkv = 2, causal with S != T.
  check(*qkv(1, 8, 200, 8, 2, 64), A.CausalMask(), impl="pallas_tpu", block_q=8,
        block_kv=128)


@pytest.mark.parametrize("impl", ["pallas_gpu", pytest.param("pallas_tpu", marks=pytest.mark.slow)])
def test_decode_kernels(impl):
  kc, vc = jnp.asarray(RNG.standard_normal((3, 200, 2, 64)), jnp.float32), \
      jnp.asarray(RNG.standard_normal((3, 200, 2, 64)), jnp.float32)
  q = jnp.asarray(RNG.standard_normal((3, 4, 64)), jnp.float32)
  lengths = jnp.asarray([0, 130, 200], jnp.int32)
  run = lambda **kw: jax.jit(lambda *a: A.decode_attention(*a, block_size=128 if impl ==
                                                           "pallas_tpu" else 32, impl=impl,
                                                           **kw))(
      q, kc, vc, lengths)
  o = run(num_splits=2)
  assert_rel_close(o, decode_reference(q, kc, vc, lengths), TOL["float32"])
  assert np.all(np.asarray(o)[0] == 0)
  xla = A.decode_attention(q, kc, vc, lengths, block_size=32, top_k_blocks=2, impl="xla")
  if impl == "pallas_gpu":
    assert_rel_close(run(top_k_blocks=2), xla, TOL["float32"])


@pytest.mark.pallas_gpu
def test_topk_triton_kernel_covering_all_is_dense():
  q, k, v = qkv(1, 100, 100, 4, 2, 64)
  w = jnp.asarray(RNG.standard_normal(q.shape), jnp.float32)
  f = lambda q, k, v: A.topk_block_attention(q, k, v, top_k=4, block_size=32, impl="pallas_gpu")
  o, grads = _value_and_vjp(f, (q, k, v), w)
  ref_o, ref_g = reference64(q, k, v, A.CausalMask(), w)
  assert_rel_close(o, ref_o, TOL["float32"])
  for g, r in zip(grads, ref_g):
    assert_rel_close(g, r, 2 * TOL["float32"])


@pytest.mark.pallas_gpu
def test_topk_triton_kernel_kv_head_scores():
  """Per-kv-head selection (NSA's shared GQA choice) reaches the kernel as
  per-query-head lists and matches the XLA path."""
  q, k, v = qkv(1, 100, 100, 4, 2, 64)
  w = jnp.asarray(RNG.standard_normal(q.shape), jnp.float32)
  scores = jnp.asarray(RNG.standard_normal((1, 2, 100, 7)), jnp.float32)
  run = lambda impl: _value_and_vjp(lambda q, k, v: A.topk_block_attention(
      q, k, v, top_k=2, block_size=16, token_scores=scores, impl=impl), (q, k, v), w)
  (o, grads), (ref_o, ref_g) = run("pallas_gpu"), run("xla")
  assert_rel_close(o, ref_o, TOL["float32"])
  for g, r in zip(grads, ref_g):
    assert_rel_close(g, r, 2 * TOL["float32"])


# --------------------------------------------------------------------------
# Cross-lowering: the JAX-side TPU (Mosaic) and Triton lowering, no hardware.

_S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_lowering_fwd_bwd(impl, platform, dtype):
  b, t, s, hq, hkv, d = 2, 256, 384, 8, 2, 128
  dense = RNG.random((t, s)) < 0.3
  mask = (A.CausalMask() & (A.LocalMask(100) | A.GlobalTokensMask(4))) | (
      A.ShiftedGroupMask(64) & A.DenseMask(dense))

  def fwd_bwd(q, k, v, qs, ks):
    f = lambda q, k, v: A.block_sparse_attention(q, k, v, mask, segment_ids=(qs, ks),
                                                 softcap=30.0, impl=impl, interpret=False)
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(o)
  cross_lower(platform, fwd_bwd, _S((b, t, hq, d), dtype), _S((b, s, hkv, d), dtype),
              _S((b, s, hkv, d), dtype), _S((b, t), jnp.int32), _S((b, s), jnp.int32))


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_cross_lowering_topk_and_decode(impl, platform):
  bs = 128
  topk = lambda q, k, v: A.topk_block_attention(q, k, v, top_k=2, block_size=bs, impl=impl,
                                                interpret=False)
  cross_lower(platform, jax.grad(lambda q, k, v: jnp.sum(topk(q, k, v)), (0, 1, 2)),
              *[_S((1, 512, h, 64), jnp.bfloat16) for h in (4, 2, 2)])
  dec = lambda q, kc, vc, n: A.decode_attention(q, kc, vc, n, top_k_blocks=2, block_size=bs,
                                                impl=impl, interpret=False)
  cross_lower(platform, dec, _S((2, 8, 128), jnp.bfloat16), _S((2, 1024, 2, 128), jnp.bfloat16),
              _S((2, 1024, 2, 128), jnp.bfloat16), _S((2,), jnp.int32))

