"""Transformer: decode equals forward, causality, packed segments, GQA, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers, transformer
from tests.numerics import assert_rel_close

CFG = transformer.TransformerConfig(vocab_size=300, num_layers=2, d_model=64, num_heads=4,
                                    num_kv_heads=2, head_dim=16, mlp_dim=96)


def _model(**kw):
  import dataclasses
  return transformer.Transformer(dataclasses.replace(CFG, **kw), rngs=nnx.Rngs(0))


_forward = nnx.jit(lambda m, tok, seg=None: m(tok, seg))
_decode = nnx.jit(lambda m, tok, cache, num_valid=None: m.decode(tok, cache, num_valid))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 259)


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 1}, {"attention": "sliding", "window": 5},
                                {"tie_embeddings": False}])
def test_kv_cache_decode_equals_full_forward(kw):
  model = _model(**kw)
  tok = _tokens((2, 23))
  full = _forward(model, tok)
  cache = model.init_cache(2, 30)
  logits, cache = _decode(model, tok[:, :9], cache)          # prefill
  steps = [logits]
  for t in range(9, 23):                                  # one token at a time
    logits, cache = _decode(model, tok[:, t:t + 1], cache)
    steps.append(logits)
  assert_rel_close(jnp.concatenate(steps, 1), full, 1e-5, "decode logits")
  np.testing.assert_array_equal(cache.lengths, [23, 23])


def test_ragged_prefill_matches_each_sequence_alone():
  model = _model()
  a, b = _tokens((1, 11), 2)[0], _tokens((1, 6), 3)[0]
  prompt = jnp.stack([a, jnp.concatenate([b, jnp.zeros(5, b.dtype)])])
  cache = model.init_cache(2, 20)
  logits, cache = _decode(model, prompt, cache, num_valid=jnp.array([11, 6]))
  np.testing.assert_array_equal(cache.lengths, [11, 6])
  nxt = jnp.array([[7], [9]])
  step, _ = _decode(model, nxt, cache)
  ref_b = _forward(model, jnp.concatenate([b, jnp.array([9])])[None])
  assert_rel_close(logits[1, :6], ref_b[0, :6], 1e-5, "ragged prefill")
  assert_rel_close(step[1, 0], ref_b[0, -1], 1e-5, "step after ragged prefill")
  ref_a = _forward(model, jnp.concatenate([a, jnp.array([7])])[None])
  assert_rel_close(step[0, 0], ref_a[0, -1], 1e-5, "step after full prefill")


def test_causal_future_tokens_do_not_change_the_past():
  model = _model()
  tok = _tokens((1, 16))
  changed = tok.at[0, 10:].set((tok[0, 10:] + 1) % 259)
  np.testing.assert_array_equal(_forward(model, tok)[0, :10], _forward(model, changed)[0, :10])
  assert not np.allclose(_forward(model, tok)[0, 10:], _forward(model, changed)[0, 10:])


def test_packed_segments_never_attend_across_documents():
  """Doc 2's logits in a packed row equal doc 2 run alone, whatever doc 1 holds."""
  model = _model()
  doc1, doc2 = _tokens((1, 9), 4), _tokens((1, 7), 5)
  other1 = _tokens((1, 9), 6)
  seg = jnp.array([[1] * 9 + [2] * 7])
  packed = _forward(model, jnp.concatenate([doc1, doc2], 1), seg)
  packed_other = _forward(model, jnp.concatenate([other1, doc2], 1), seg)
  alone = _forward(model, doc2)
  assert_rel_close(packed[:, 9:], alone, 1e-5, "doc 2 packed vs alone")
  np.testing.assert_array_equal(packed[:, 9:], packed_other[:, 9:])
  # Without segment ids doc 2 does see doc 1: the check above is not vacuous.
  unsegmented = _forward(model, jnp.concatenate([doc1, doc2], 1))
  assert not np.allclose(unsegmented[:, 9:], alone, atol=1e-3)


def test_segment_positions_restart_at_each_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(layers.segment_positions(seg),
                                [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))])


def test_rope_is_a_relative_rotation():
  """<R(p)q, R(p')k> depends only on p - p'."""
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 32))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))
  dot = lambda p, r: jnp.sum(layers.apply_rope(q, jnp.array([[p]])) *
                             layers.apply_rope(k, jnp.array([[r]])))
  np.testing.assert_allclose(dot(3, 1), dot(12, 10), rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, jnp.array([[7]]))),
                             jnp.linalg.norm(q), rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _model(dtype="bfloat16")
  assert model.blocks[0].attn.q_proj.kernel[...].dtype == jnp.float32
  logits = _forward(model, _tokens((2, 12)))
  assert logits.dtype == jnp.float32
  assert_rel_close(logits, _forward(_model(), _tokens((2, 12))), 2e-2, "bf16 vs f32 logits")


def test_remat_gives_the_same_gradients():
  tok = _tokens((2, 12))
  def grads(model):
    return nnx.grad(lambda m: jnp.mean(m(tok) ** 2))(model)
  g0, g1 = grads(_model()), grads(_model(remat=True))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="num_kv_heads must divide num_heads=4, got 3"):
    _model(num_kv_heads=3)
  with pytest.raises(ValueError, match="unknown transformer config keys"):
    transformer.TransformerConfig.from_config({**CFG.__dict__, "bogus": 1})
