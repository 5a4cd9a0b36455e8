"""Transformer attention patterns: float64 references, decode == forward, packed
segments, S2 only in training, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from gemkit import config as config_lib
from models import transformer
from ops import attention as attention_ops
from tests.helpers import tiny_config
from tests.numerics import assert_rel_close

CFG = transformer.TransformerConfig(vocab_size=300, num_layers=1, d_model=64, num_heads=4,
                                    num_kv_heads=2, head_dim=16, mlp_dim=96, block_size=4)
PATTERNS = {
    "sliding": dict(attention="sliding", window=5),
    "global": dict(attention="global", window=4, global_tokens=3),
    "s2": dict(attention="s2", s2_group=6),
    "topk": dict(attention="topk", top_k=1),      # 3 of the 6 blocks of 23 tokens
}

_forward = nnx.jit(lambda m, tok, seg=None, train=None: m(tok, seg, train=train),
                   static_argnames="train")
_decode = nnx.jit(lambda m, tok, cache, num_valid=None: m.decode(tok, cache, num_valid))


def _model(**kw):
  return transformer.Transformer(dataclasses.replace(CFG, **kw), rngs=nnx.Rngs(0))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 259)


def _allowed(pattern: str, cfg, T: int, H: int, seg: np.ndarray) -> np.ndarray:
  """[B, H, T, T] bool, written out from the definitions (not from ops masks)."""
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  allowed = np.broadcast_to(j <= i, (H, T, T)).copy()
  if pattern == "sliding":
    allowed &= i - j < cfg.window
  elif pattern == "global":
    allowed &= (i - j < cfg.window) | (j < cfg.global_tokens)
  elif pattern == "s2":
    for h in range(H):
      shift = cfg.s2_group // 2 if h >= H // 2 else 0
      allowed[h] &= (i + shift) // cfg.s2_group == (j + shift) // cfg.s2_group
  same = seg[:, :, None] == seg[:, None, :]
  return allowed[None] & same[:, None]


def _reference64(q, k, v, allowed):
  """Float64 softmax attention with GQA, allowed [B, H, T, S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("pattern", ["dense", "sliding", "global", "s2"])
def test_training_attention_matches_float64_reference(pattern):
  """Packed rows, GQA, T=19 (not a multiple of the block): attend == reference."""
  cfg = dataclasses.replace(CFG, **PATTERNS.get(pattern, {}))
  attn = transformer.Attention(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 19, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 19, 2, 16)), jnp.float32) for _ in range(2))
  seg = np.array([[1] * 7 + [2] * 12, [1] * 19])
  out = jax.jit(lambda q, k, v, s: attn.attend(q, k, v, s, train=True))(q, k, v, seg)
  assert_rel_close(out, _reference64(q, k, v, _allowed(pattern, cfg, 19, 4, seg)), 1e-5,
                   f"{pattern} attention")


def test_griffin_local_attention_config_uses_local_mask():
  cfg = dataclasses.replace(CFG, attention="sliding", window=7)
  assert transformer.pattern_mask(cfg) == (attention_ops.CausalMask()
                                           & attention_ops.LocalMask(7))


@pytest.mark.parametrize("kw", [PATTERNS["global"], PATTERNS["s2"],
                                dict(attention="topk", top_k=8)],   # top_k covers all blocks
                         ids=["global", "s2", "topk_all"])
def test_decode_equals_forward(kw):
  """Prefill of 9 tokens (block-sparse over the cache), then 14 decode_attention steps."""
  model = _model(**kw)
  tok = _tokens((2, 23))
  full = _forward(model, tok)
  cache = model.init_cache(2, 30)
  logits, cache = _decode(model, tok[:, :9], cache)
  steps = [logits]
  for t in range(9, 23):
    logits, cache = _decode(model, tok[:, t:t + 1], cache)
    steps.append(logits)
  assert_rel_close(jnp.concatenate(steps, 1), full, 1e-5, "decode logits")


def test_ragged_prefill_equals_forward_of_each_prompt():
  """Right-padded prompts: each row's prefill equals the forward pass of its prompt
  alone, with a binding top-k selection (the prompt's own block means)."""
  model = _model(**PATTERNS["topk"])
  a, b = _tokens((1, 21), 2)[0], _tokens((1, 14), 3)[0]
  prompt = jnp.stack([a, jnp.concatenate([b, jnp.full(7, 5, b.dtype)])])
  logits, cache = _decode(model, prompt, model.init_cache(2, 26), jnp.array([21, 14]))
  np.testing.assert_array_equal(cache.lengths, [21, 14])
  ref_a, ref_b = _forward(model, a[None]), _forward(model, b[None])
  assert_rel_close(logits[0], ref_a[0], 1e-5, "prefill a")
  assert_rel_close(logits[1, :14], ref_b[0], 1e-5, "prefill b")
  dense = _forward(_model(), a[None])     # the selection is binding: not dense attention
  assert not np.allclose(dense[0, 16:], ref_a[0, 16:], atol=1e-3)


@pytest.mark.parametrize("pattern", ["sliding", "global", "s2", "topk"])
def test_packed_documents_never_attend_across(pattern):
  """Doc 2's logits do not depend on doc 1's tokens (doc 2 starts at a block
  boundary so that no top-k query block spans both documents)."""
  model = _model(**PATTERNS[pattern])
  doc1, other1, doc2 = _tokens((1, 8), 4), _tokens((1, 8), 6), _tokens((1, 15), 5)
  seg = jnp.array([[1] * 8 + [2] * 15])
  packed = _forward(model, jnp.concatenate([doc1, doc2], 1), seg, train=True)
  packed_other = _forward(model, jnp.concatenate([other1, doc2], 1), seg, train=True)
  np.testing.assert_array_equal(packed[:, 8:], packed_other[:, 8:])
  assert not np.allclose(packed[:, :8], packed_other[:, :8])
  if pattern == "sliding":   # relative positions: the same as doc 2 alone
    assert_rel_close(packed[:, 8:], _forward(model, doc2), 1e-5, "doc 2 alone")


def test_s2_only_in_training():
  """S2 model == dense model (same weights) at inference; S2 when training (rngs)."""
  s2, dense = _model(**PATTERNS["s2"]), _model()
  tok = _tokens((2, 17))
  np.testing.assert_array_equal(_forward(s2, tok), _forward(dense, tok))
  trained = _forward(s2, tok, train=True)
  assert not np.allclose(trained, _forward(dense, tok), atol=1e-3)
  with_rngs = nnx.jit(lambda m, t: m(t, rngs=nnx.Rngs(dropout=0)))(s2, tok)
  np.testing.assert_array_equal(with_rngs, trained)


def test_config_keys_build_every_pattern_and_bad_values_name_the_key():
  for pattern, kw in PATTERNS.items():
    cfg = tiny_config(**{"model.attention": pattern, "model.block_size": 8,
                         **{f"model.{k}": v for k, v in kw.items() if k != "attention"}})
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    assert model.cfg.attention == pattern
  for overrides, key in [({"model.attention": "topk"}, "model.top_k"),
                         ({"model.attention": "s2", "model.s2_group": 1}, "model.s2_group"),
                         ({"model.attention": "global", "model.window": 8}, "model.global_tokens"),
                         ({"model.attention": "bogus"}, "model.attention"),
                         ({"model.block_size": 0}, "model.block_size")]:
    with pytest.raises(config_lib.ConfigError, match=key):
      tiny_config(**overrides)
  with pytest.raises(ValueError, match="s2_group >= 2"):
    _model(attention="s2", s2_group=1)
