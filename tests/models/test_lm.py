"""The LM shell (models.lm): attention is one more mixer, one cache for every
mixer, and the parameter paths gemkit.hf, LoRA / quantization rules and
checkpoints name."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models import linear_rnn, lm, transformer
from tests.numerics import assert_rel_close

LRNN = linear_rnn.LinearRNNConfig(vocab_size=300, num_layers=4, d_model=32, mlp_dim=48,
                                  num_heads=2, head_dim=16, chunk_size=16)
ATTN = transformer.TransformerConfig(vocab_size=300, num_layers=4, d_model=32, num_heads=4,
                                     num_kv_heads=2, head_dim=8, mlp_dim=48)


def _hybrid():
  """GLA and dense attention layers, alternating, in one shell."""
  rngs = nnx.Rngs(0)
  mixer = lambda i: (transformer.Attention(ATTN, rngs=rngs) if i % 2
                     else linear_rnn.GatedLinearAttention(LRNN, rngs=rngs))
  return lm.LM(LRNN, mixer, rngs=rngs)


def test_hybrid_attention_and_gla_decode_equals_forward():
  model = _hybrid()
  tok = jax.random.randint(jax.random.key(1), (2, 26), 0, 259)
  full = nnx.jit(lambda m, t: m(t))(model, tok)
  decode = nnx.jit(lambda m, t, c, n: m.decode(t, c, n))
  ragged = tok[:, :20].at[1, 13:].set(0)           # row 1: 13 real tokens, then padding
  logits, cache = decode(model, ragged, model.init_cache(2, 32), jnp.array([20, 13]))
  assert isinstance(cache, lm.Cache) and set(cache.layers[1]) == {"k", "v"}
  assert set(cache.layers[0]) == {"S", "conv"}
  assert_rel_close(logits[0], full[0, :20], 1e-5, "prefill, full row")
  assert_rel_close(logits[1, :13], full[1, :13], 1e-5, "prefill, ragged row")
  steps = []
  for t in range(20, 26):
    logits, cache = decode(model, tok[:, t:t + 1], cache, jnp.ones((2,), jnp.int32))
    steps.append(logits[0])
  assert_rel_close(jnp.concatenate(steps), full[0, 20:], 1e-5, "decode steps")
  np.testing.assert_array_equal(cache.lengths, [26, 19])


def _block0(family_cfg):
  model = nnx.eval_shape(lambda: models.build(family_cfg, rngs=nnx.Rngs(0)))
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
  return paths, {p[len("blocks/0/"):] for p in paths if p.startswith("blocks/0/")}


def test_parameter_paths_per_family():
  tf = dict(family="transformer", vocab_size=64, num_layers=2, d_model=16, num_heads=2,
            num_kv_heads=1, head_dim=8, mlp_dim=32)
  paths, block = _block0(tf | dict(post_norms=True, qk_norm=True, tie_embeddings=False))
  assert {"embed/embedding", "final_norm/scale", "head/kernel"} <= paths
  mlp = {f"mlp/{p}_proj/kernel" for p in ("gate", "up", "down")}
  assert block == {"attn_norm/scale", "attn/q_proj/kernel", "attn/k_proj/kernel",
                   "attn/v_proj/kernel", "attn/o_proj/kernel", "attn/q_norm/scale",
                   "attn/k_norm/scale", "mlp_norm/scale", "post_attn_norm/scale",
                   "post_mlp_norm/scale"} | mlp
  paths, block = _block0(dict(family="griffin", vocab_size=64, num_layers=1, d_model=16,
                              mlp_dim=32, num_heads=2, head_dim=8, block_pattern="A"))
  assert "head/kernel" not in paths
  assert block == {"mix_norm/scale", "mixer/attn/q_proj/kernel", "mixer/attn/k_proj/kernel",
                   "mixer/attn/v_proj/kernel", "mixer/attn/o_proj/kernel",
                   "mlp_norm/scale"} | mlp
  _, block = _block0(dict(family="linear_rnn", vocab_size=64, num_layers=1, d_model=16,
                          mlp_dim=0, mixer="mamba", state_dim=4))
  assert block == {"mix_norm/scale"} | {f"mixer/{p}" for p in (
      "in_proj/kernel", "conv/kernel", "conv/bias", "x_proj/kernel", "dt_proj/kernel",
      "dt_bias", "a_log", "d_skip", "out_proj/kernel")}
