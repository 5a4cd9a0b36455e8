"""Linear-RNN stacks (GLA, DeltaNet, gated DeltaNet, Mamba-style): decode = forward,
ragged prefill, segment resets, the eigenvalue-range map, training by config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemkit import config as config_lib
from gemkit import runs
from models import linear_rnn
from tests.helpers import write_corpus
from tests.numerics import assert_rel_close

CFG = linear_rnn.LinearRNNConfig(vocab_size=300, num_layers=1, d_model=32, mlp_dim=48,
                                 num_heads=2, head_dim=16, state_dim=4, chunk_size=16)
MODELS = [("gla", "[0,1]"), ("deltanet", "[-1,1]"), ("gated_deltanet", "[0,1]"),
          ("mamba", "[-1,1]")]
T, PREFILL = 30, 21        # prefill spans a chunk boundary (chunk 16); doc 2 = PREFILL tokens


def _model(mixer, eigenvalue_range, **kw):
  cfg = dataclasses.replace(CFG, mixer=mixer, eigenvalue_range=eigenvalue_range, **kw)
  return linear_rnn.LinearRNN(cfg, rngs=nnx.Rngs(0))


_forward = nnx.jit(lambda m, tok, seg: m(tok, seg))
_decode = nnx.jit(lambda m, tok, cache, num_valid: m.decode(tok, cache, num_valid))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, 259)


def _full(n):
  return jnp.full((2,), n, jnp.int32)


@pytest.mark.parametrize("mixer,eigenvalue_range", MODELS)
def test_decode_equals_forward(mixer, eigenvalue_range):
  model = _model(mixer, eigenvalue_range)
  tok = _tokens((2, T))
  full = _forward(model, tok, jnp.ones_like(tok))
  logits, cache = _decode(model, tok[:, :PREFILL], model.init_cache(2, 64), _full(PREFILL))
  steps = [logits]
  for t in range(PREFILL, T):
    logits, cache = _decode(model, tok[:, t:t + 1], cache, _full(1))
    steps.append(logits)
  assert_rel_close(jnp.concatenate(steps, 1), full, 1e-5, f"{mixer} decode logits")
  # The state does not grow with the sequence.
  sizes = jax.tree.map(lambda x: x.shape, model.init_cache(2, 10_000))
  assert sizes == jax.tree.map(lambda x: x.shape, cache)


@pytest.mark.parametrize("mixer,eigenvalue_range", MODELS)
def test_ragged_prefill_and_packed_segments(mixer, eigenvalue_range):
  """A short right-padded prompt decodes as if alone; a packed second document
  gives the logits it gives alone, whatever the first document holds."""
  model = _model(mixer, eigenvalue_range)
  doc2 = _tokens((2, PREFILL), 5)
  alone, _ = _decode(model, doc2, model.init_cache(2, 64), _full(PREFILL))
  seg = jnp.array([[1] * (T - PREFILL) + [2] * PREFILL] * 2)
  for seed in (4, 6):
    packed = _forward(model, jnp.concatenate([_tokens((2, T - PREFILL), seed), doc2], 1),
                      seg)
    assert_rel_close(packed[:, T - PREFILL:], alone, 1e-5, f"{mixer} packed doc 2")
  unsegmented = _forward(model, jnp.concatenate([_tokens((2, T - PREFILL), 4), doc2], 1),
                         jnp.ones_like(seg))
  assert not np.allclose(unsegmented[:, T - PREFILL:], alone, atol=1e-3)

  short = 7
  prompt = doc2.at[1, short:].set(0)
  logits, cache = _decode(model, prompt, model.init_cache(2, 64), jnp.array([PREFILL, short]))
  step, _ = _decode(model, doc2[:, short:short + 1], cache, _full(1))
  assert_rel_close(logits[1, :short], alone[1, :short], 1e-5, "ragged prefill")
  assert_rel_close(step[1, 0], alone[1, short], 1e-5, "step after a ragged prefill")


def test_eigenvalue_range_maps_a_to_2a_minus_1_and_beta_to_2_beta():
  x = jax.random.normal(jax.random.key(2), (2, 11, CFG.d_model))
  reset = jnp.zeros((2, 11), bool).at[:, 0].set(True)
  ssm = {r: _model("mamba", r).blocks[0].mixer for r in ("[0,1]", "[-1,1]")}
  u, _, _ = ssm["[0,1]"]._branches(x, None, None)
  a01, b01, c01 = ssm["[0,1]"].coefficients(u, reset)
  a11, b11, c11 = ssm["[-1,1]"].coefficients(u, reset)
  np.testing.assert_allclose(a11[:, 1:], 2 * a01[:, 1:] - 1, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(a11[:, 0], 0.0)           # reset at the segment start
  np.testing.assert_array_equal(b11, b01)
  assert float(a01.min()) >= 0.0 and float(a01.max()) <= 1.0
  # A strong step dt drives a to -1 under [-1, 1] (a negative eigenvalue), to 0 under [0, 1].
  strong = ssm["[-1,1]"]
  strong.dt_bias[...] = jnp.full_like(strong.dt_bias[...], 20.0)
  assert float(strong.coefficients(u, reset)[0][:, 1:].max()) < -0.99

  delta = {r: _model("deltanet", r).blocks[0].mixer for r in ("[0,1]", "[-1,1]")}
  beta01, beta11 = delta["[0,1]"].beta(x), delta["[-1,1]"].beta(x)
  np.testing.assert_allclose(beta11, 2 * beta01, rtol=1e-6)
  assert float(beta01.max()) < 1.0 < float(beta11.max()) <= 2.0


@pytest.mark.parametrize("experiment", [pytest.param("gla_tiny", marks=pytest.mark.slow),
                                        "deltanet_tiny"])
def test_experiment_trains_through_runs_train(tmp_path, experiment):
  cfg = config_lib.load(f"experiments/{experiment}.py", **{
      "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
      "model.head_dim": 16, "model.mlp_dim": 64, "model.chunk_size": 16,
      "data.source": "text", "data.path": write_corpus(tmp_path, 8),
      "data.heldout_fraction": 0.25, "data.seq_len": 16, "data.eval_windows": 2,
      "data.prefetch": 1, "train.batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
      "train.log_every": 1, "train.checkpoint_every": 100, "train.async_checkpoint": False,
      "train.sample_tokens": 4})
  summary = runs.train(cfg, str(tmp_path / "run"))   # what launch.train runs
  assert summary["step"] == 2 and np.isfinite(summary["final_train_loss"])
  assert np.isfinite(summary["heldout_loss"]) and isinstance(summary["sample"], str)


def test_bad_config_names_the_key():
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.eigenvalue_range: '\[-1,1\]' needs mixer"):
    config_lib.load("experiments/gla_tiny.py", **{"model.eigenvalue_range": "[-1,1]"})
  with pytest.raises(config_lib.ConfigError, match="model.mixer: must be one of"):
    config_lib.load("experiments/deltanet_tiny.py", **{"model.mixer": "lstm"})
