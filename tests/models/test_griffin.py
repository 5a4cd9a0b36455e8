"""Griffin / Hawk: RG-LRU vs a float64 NumPy recurrence, decode = forward, segment resets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemkit import config as config_lib
from gemkit import sample, train
from models import griffin
from tests.helpers import write_corpus
from tests.numerics import assert_rel_close

CFG = griffin.GriffinConfig(vocab_size=300, num_layers=3, d_model=32, num_heads=2,
                            head_dim=16, mlp_dim=48, window=5, block_pattern="RRA")


def _model(**kw):
  return griffin.Griffin(dataclasses.replace(CFG, **kw), rngs=nnx.Rngs(0))


_forward = nnx.jit(lambda m, tok, seg: m(tok, seg))
_decode = nnx.jit(lambda m, tok, cache, num_valid: m.decode(tok, cache, num_valid))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 259)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _rg_lru_numpy(lru, u, reset, h0):
  """The paper's equations, one step at a time, in float64."""
  def block_diag(layer, x):
    w = np.asarray(layer.kernel[...], np.float64)
    b = np.asarray(layer.bias[...], np.float64)
    xs = x.reshape(x.shape[0], w.shape[0], w.shape[1])
    return (np.einsum("bhi,hij->bhj", xs, w) + b).reshape(x.shape)

  lam = np.asarray(lru.a_param[...], np.float64)
  h, out = h0.copy(), []
  for t in range(u.shape[1]):
    x = u[:, t]
    r = _sigmoid(block_diag(lru.recurrence_gate, x))
    i = _sigmoid(block_diag(lru.input_gate, x))
    a = _sigmoid(lam) ** (8.0 * r)
    scale = np.sqrt(1.0 - a * a)
    a = np.where(reset[:, t, None], 0.0, a)
    scale = np.where(reset[:, t, None], 1.0, scale)
    h = a * h + scale * (i * x)
    out.append(h)
  return np.stack(out, 1), h


def test_rg_lru_matches_float64_recurrence():
  lru = griffin.RGLRU(12, 3, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(0)
  u = rng.normal(size=(2, 37, 12))
  reset = np.zeros((2, 37), bool)
  reset[0, 0], reset[1, 20] = True, True            # row 1 continues from h0 until t = 20
  h0 = rng.normal(size=(2, 12))
  h, h_last = lru(jnp.asarray(u, jnp.float32), jnp.asarray(reset),
                  jnp.asarray(h0, jnp.float32))
  ref, ref_last = _rg_lru_numpy(lru, u, reset, h0)
  assert_rel_close(h, ref, 1e-5, "RG-LRU states")
  assert_rel_close(h_last, ref_last, 1e-5, "RG-LRU last state")
  # sigma(Lambda)^c starts in [0.9, 0.999] (the paper's initialisation).
  a_c = _sigmoid(np.asarray(lru.a_param[...], np.float64)) ** 8
  assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6


def test_sqrt_bounded_has_finite_gradient_at_zero():
  g = jax.grad(lambda x: griffin.sqrt_bounded(x))(0.0)
  assert float(g) == pytest.approx(griffin.MAX_SQRT_GRADIENT)
  assert float(jax.grad(griffin.sqrt_bounded)(4.0)) == pytest.approx(0.25)


@pytest.mark.parametrize("pattern", ["RRA", "R"])
def test_decode_equals_forward(pattern):
  """Prefill 9 tokens, then one at a time past the local window (ring buffer)."""
  model = _model(block_pattern=pattern, num_layers=2 if pattern == "R" else 3)
  tok = _tokens((2, 20))
  full = _forward(model, tok, jnp.ones_like(tok))
  cache = model.init_cache(2, 64)
  n = jnp.full((2,), 9, jnp.int32)
  logits, cache = _decode(model, tok[:, :9], cache, n)
  steps = [logits]
  for t in range(9, 20):
    logits, cache = _decode(model, tok[:, t:t + 1], cache, jnp.ones((2,), jnp.int32))
    steps.append(logits)
  assert_rel_close(jnp.concatenate(steps, 1), full, 1e-5, f"{pattern} decode logits")
  np.testing.assert_array_equal(cache.lengths, [20, 20])
  if pattern == "RRA":   # the attention cache is the window, not max_len
    assert cache.layers[2]["k"].shape == (2, CFG.window, 1, CFG.head_dim)


def test_ragged_prefill_matches_each_sequence_alone():
  """Row 1's prompt is 4 of the 9 prefilled tokens; 11 steps take it past the window."""
  model = _model()
  tok = _tokens((2, 20), 2)
  prompt = tok[:, :9].at[1, 4:].set(0)
  logits, cache = _decode(model, prompt, model.init_cache(2, 64), jnp.array([9, 4]))
  rows = [tok[0], jnp.concatenate([tok[1, :4], tok[1, 9:], tok[1, 4:9]])]  # row 1: 4 + 11
  for t in range(11):
    nxt = jnp.stack([rows[0][9 + t], rows[1][4 + t]])[:, None]
    step, cache = _decode(model, nxt, cache, jnp.ones((2,), jnp.int32))
  ref = _forward(model, jnp.stack(rows), jnp.ones((2, 20), jnp.int32))   # causal: the
  assert_rel_close(logits[1, :4], ref[1, :4], 1e-5, "ragged prefill")  # tail of row 1 is unseen
  assert_rel_close(step[0, 0], ref[0, 19], 1e-5, "full row after steps")
  assert_rel_close(step[1, 0], ref[1, 14], 1e-5, "ragged row after steps")
  np.testing.assert_array_equal(cache.lengths, [20, 15])


def test_packed_document_is_unaffected_by_the_one_before():
  """Doc 2 of a packed row equals doc 2 alone: RG-LRU, conv and attention reset."""
  model = _model()
  doc2 = _tokens((2, 9), 5)                          # the shapes of the tests above
  seg = jnp.array([[1] * 11 + [2] * 9] * 2)
  packed = _forward(model, jnp.concatenate([_tokens((2, 11), 4), doc2], 1), seg)
  other = _forward(model, jnp.concatenate([_tokens((2, 11), 6), doc2], 1), seg)
  alone, _ = _decode(model, doc2, model.init_cache(2, 64), jnp.full((2,), 9, jnp.int32))
  assert_rel_close(packed[:, 11:], alone, 1e-5, "doc 2 packed vs alone")
  assert_rel_close(other[:, 11:], alone, 1e-5, "doc 2 after another doc 1")
  unsegmented = _forward(model, jnp.concatenate([_tokens((2, 11), 4), doc2], 1),
                         jnp.ones_like(seg))
  assert not np.allclose(unsegmented[:, 11:], alone, atol=1e-3)


def test_greedy_generation_is_the_forward_argmax():
  """gemkit.sample drives the recurrent cache: each greedy token is the argmax of
  the full forward pass over the prompt and the tokens before it (causal)."""
  model = _model()
  prompt = np.asarray(_tokens((1, 7), 8)[0])
  out = sample.generate_ids(model, [prompt], max_new_tokens=6)[0]
  seq = jnp.asarray(np.concatenate([prompt, out]))[None]
  logits = _forward(model, seq, jnp.ones_like(seq))
  np.testing.assert_array_equal(out, np.asarray(jnp.argmax(logits[0, 6:12], -1)))


@pytest.mark.parametrize("experiment", ["griffin_tiny",
                                        pytest.param("hawk_tiny", marks=pytest.mark.slow)])
def test_experiment_trains_through_the_trainer(tmp_path, experiment):
  cfg = config_lib.load(f"experiments/{experiment}.py", **{
      "model.num_layers": 3 if experiment == "griffin_tiny" else 2, "model.d_model": 32,
      "model.num_heads": 2, "model.head_dim": 16, "model.mlp_dim": 64,
      "model.window": 8, "data.source": "text", "data.path": write_corpus(tmp_path, 8),
      "data.heldout_fraction": 0.25, "data.seq_len": 16, "data.eval_windows": 2,
      "data.prefetch": 1, "train.batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
      "train.log_every": 1, "train.checkpoint_every": 100, "train.async_checkpoint": False})
  trainer = train.Trainer(cfg, tmp_path / "run")
  try:
    logs = trainer.run()
  finally:
    trainer.close()
  losses = [r["loss"] for r in logs if r["split"] == "train"]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert trainer.step == 2


def test_bad_config_names_the_key():
  with pytest.raises(config_lib.ConfigError, match="model.block_pattern: must be"):
    config_lib.load("experiments/griffin_tiny.py", **{"model.block_pattern": "RX"})
  with pytest.raises(config_lib.ConfigError,
                     match="model.num_heads: must divide the RG-LRU width .*got 3"):
    config_lib.load("experiments/hawk_tiny.py", **{"model.num_heads": 3})
  with pytest.raises(ValueError, match="unknown griffin config keys: \\['bogus'\\]"):
    griffin.GriffinConfig.from_config({**dataclasses.asdict(CFG), "bogus": 1})
