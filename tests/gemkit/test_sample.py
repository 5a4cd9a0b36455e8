"""Sampling: the filters against NumPy, greedy decoding against the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemkit import data, sample
from models import transformer

CFG = transformer.TransformerConfig(vocab_size=300, num_layers=2, d_model=64, num_heads=4,
                                    num_kv_heads=2, head_dim=16, mlp_dim=96)


def _empirical(logits, n=4000, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.vmap(lambda k: sample.sample_logits(logits[None], k, **kw)[0])(keys)
  return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def test_top_k_and_top_p_keep_the_right_support():
  logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  freq = _empirical(logits, top_k=2)
  assert freq[2:].sum() == 0
  np.testing.assert_allclose(freq[:2], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)
  # top_p = 0.8: mass before token 2 is 0.7 < 0.8 so it stays; token 3 (0.85) goes.
  freq = _empirical(logits, top_p=0.8)
  assert freq[3:].sum() == 0 and freq[2] > 0
  np.testing.assert_allclose(freq[:3], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)
  np.testing.assert_allclose(_empirical(logits, temperature=1.0), np.exp(logits), atol=0.03)
  assert sample.sample_logits(logits[None], jax.random.key(1), temperature=0.0)[0] == 0


def test_greedy_generation_matches_argmax_of_full_forward():
  model = transformer.Transformer(CFG, rngs=nnx.Rngs(0))
  prompts = [data.ByteTokenizer().encode(p, bos=True) for p in ["def f(x):", "ab"]]
  out = sample.generate_ids(model, prompts, max_new_tokens=6, temperature=0.0)
  forward = nnx.jit(lambda m, t: m(t))
  for prompt, row in zip(prompts, out):
    seq = np.zeros(len(prompt) + 6, np.int32)       # causal: the zero tail is never seen
    seq[:len(prompt)] = prompt
    for i in range(len(prompt), len(seq)):
      seq[i] = int(jnp.argmax(forward(model, jnp.asarray(seq[None]))[0, i - 1]))
    assert list(row) == list(seq[len(prompt):])


def test_generate_returns_text_and_is_seeded():
  model = transformer.Transformer(CFG, rngs=nnx.Rngs(0))
  a = sample.generate(model, ["x = "], max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
  b = sample.generate(model, ["x = "], max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
  assert a == b and isinstance(a[0], str)
