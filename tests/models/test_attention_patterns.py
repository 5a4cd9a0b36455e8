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
    "topk_quest": dict(attention="topk", top_k=1, topk_scores="quest"),
    "topk_nsa": dict(attention="topk", top_k=1, topk_scores="compressed", compressed_branch=True),
    "topk_nsa_q2": dict(attention="topk", top_k=1, topk_scores="compressed",
                        compressed_branch=True, query_block=2),
    "topk_quest_branch": dict(attention="topk", top_k=1, topk_scores="quest",
                              compressed_branch=True),
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
                                dict(attention="topk", top_k=8),   # top_k covers all blocks
                                dict(attention="topk", top_k=8, topk_scores="compressed",
                                     compressed_branch=True)],
                         ids=["global", "s2", "topk_all", "topk_nsa_all"])
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


@pytest.mark.parametrize("pattern", ["topk", "topk_quest", "topk_nsa", "topk_nsa_q2",
                                     "topk_quest_branch"])
def test_ragged_prefill_equals_forward_of_each_prompt(pattern):
  """Right-padded prompts: each row's prefill equals the forward pass of its prompt
  alone, with a binding top-k selection (the prompt's own block scores)."""
  model = _model(**PATTERNS[pattern])
  a, b = _tokens((1, 21), 2)[0], _tokens((1, 14), 3)[0]
  prompt = jnp.stack([a, jnp.concatenate([b, jnp.full(7, 5, b.dtype)])])
  logits, cache = _decode(model, prompt, model.init_cache(2, 26), jnp.array([21, 14]))
  np.testing.assert_array_equal(cache.lengths, [21, 14])
  ref_a, ref_b = _forward(model, a[None]), _forward(model, b[None])
  assert_rel_close(logits[0], ref_a[0], 1e-5, "prefill a")
  assert_rel_close(logits[1, :14], ref_b[0], 1e-5, "prefill b")
  dense = _forward(_model(), a[None])     # the selection is binding: not dense attention
  assert not np.allclose(dense[0, 16:], ref_a[0, 16:], atol=1e-3)


@pytest.mark.parametrize("pattern", ["sliding", "global", "s2", "topk", "topk_quest",
                                     "topk_nsa"])
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


def _compressed64(q, k, v, block, seg):
  """Float64 loops over queries and blocks: NSA's compressed branch with mean pooling."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  hkv, nk = k.shape[2], -(-T // block)
  o, scores = np.zeros_like(q), np.zeros((B, T, hkv, nk))
  for b in range(B):
    for i in range(T):
      blocks = [c for c in range(T // block) if (c + 1) * block - 1 <= i
                and (seg[b, c * block:(c + 1) * block] == seg[b, i]).all()]
      for h in range(H):
        g = h // (H // hkv)
        if not blocks:
          continue
        kbar = np.stack([k[b, c * block:(c + 1) * block, g].mean(0) for c in blocks])
        vbar = np.stack([v[b, c * block:(c + 1) * block, g].mean(0) for c in blocks])
        s = kbar @ q[b, i, h] / np.sqrt(D)
        p = np.exp(s - s.max())
        p /= p.sum()
        o[b, i, h] = p @ vbar
        scores[b, i, g, blocks] += p
  return o, scores


def test_compressed_branch_matches_float64_reference():
  """compressed_attention: complete past blocks of the query's own segment only,
  GQA, an incomplete last block, rows before the first complete block give 0."""
  B, T, block = 2, 23, 4
  keys = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(keys[0], (B, T, 4, 16))
  k, v = (jax.random.normal(key, (B, T, 2, 16)) for key in keys[1:])
  seg = np.array([[1] * T, [1] * 9 + [2] * 14])
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  o, scores = transformer.compressed_attention(q, k, v, pos, block, jnp.asarray(seg),
                                               jnp.asarray(seg))
  ref_o, ref_scores = _compressed64(q, k, v, block, seg)
  assert_rel_close(o, ref_o, 1e-5, "o")
  assert_rel_close(scores, ref_scores, 1e-5, "scores")
  assert not np.asarray(o[:, :3]).any()


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
  for kw in PATTERNS.values():
    cfg = tiny_config(**{"model.block_size": 8, **{f"model.{k}": v for k, v in kw.items()}})
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    assert dataclasses.asdict(model.cfg).items() >= kw.items()
  for overrides, key in [({"model.attention": "topk"}, "model.top_k"),
                         ({"model.attention": "s2", "model.s2_group": 1}, "model.s2_group"),
                         ({"model.attention": "global", "model.window": 8}, "model.global_tokens"),
                         ({"model.attention": "bogus"}, "model.attention"),
                         ({"model.topk_scores": "max"}, "model.topk_scores"),
                         ({"model.topk_scores": "compressed"}, "model.compressed_branch"),
                         ({"model.block_size": 0}, "model.block_size"),
                         ({"model.query_block": -1}, "model.query_block")]:
    with pytest.raises(config_lib.ConfigError, match=key):
      tiny_config(**overrides)
  with pytest.raises(ValueError, match="s2_group must be >= 2 with attention='s2', got 1"):
    _model(attention="s2", s2_group=1)
