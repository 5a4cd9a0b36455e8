"""State tracking with linear RNNs: parity and modular counting, train short, test long.

Reproduces the finding of Grazzi et al. 2024 ("Unlocking State-Tracking in
Linear RNNs Through Negative Eigenvalues"): a linear RNN whose transition
eigenvalues lie in [0, 1] cannot track parity, and one whose eigenvalues can
be negative ([-1, 1]) can, and keeps doing so on sequences several times
longer than those it was trained on.

Task (``gemkit.synthetic.Counting(running=True)``): a random bit string
b_1..b_n, and at every position the target sum(b_1..b_i) mod k (k = 2:
parity). A model is trained on strings of ``task.train_length`` bits (every
prefix is labelled, so it sees all lengths up to that) and scored on fresh
strings of each ``task.test_lengths``: the accuracy of the answer for the
whole string (the prediction at the last position), chance = 1 / k.

For every modulus x mixer x eigenvalue range of the config one model (a
``linear_rnn`` family model, ``config.model`` with ``mixer`` and
``eigenvalue_range`` set) is trained with ``gemkit.train.train_step`` and the
config's ``train`` block. ``python -m launch.state_tracking`` runs the grid.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import models
from gemkit import optim
from gemkit import synthetic
from gemkit import train as train_lib
from gemkit.config import ConfigError
from models import linear_rnn


def task(modulus: int, length: int) -> synthetic.Counting:
  return synthetic.Counting(length=length, modulus=modulus, running=True)


def validate(config: ml_collections.ConfigDict) -> None:
  """ConfigError, naming the key, for a state-tracking config that cannot work."""
  t = config.task
  if not t.moduli or any(not 2 <= k <= 10 for k in t.moduli):
    raise ConfigError("task.moduli", f"must be moduli in [2, 10], got {t.moduli}")
  if t.train_length < 1:
    raise ConfigError("task.train_length", f"must be >= 1, got {t.train_length}")
  if any(n < 1 for n in t.test_lengths):
    raise ConfigError("task.test_lengths", f"must be lengths >= 1, got {t.test_lengths}")
  if t.eval_examples < 1:
    raise ConfigError("task.eval_examples", f"must be >= 1, got {t.eval_examples}")
  for key, allowed in (("mixers", linear_rnn.MIXERS),
                       ("eigenvalue_ranges", linear_rnn.EIGENVALUE_RANGES)):
    if not t[key] or any(v not in allowed for v in t[key]):
      raise ConfigError(f"task.{key}", f"must be a non-empty tuple of {allowed}, got {t[key]}")
  for key in ("steps", "batch_size", "log_every"):
    if config.train[key] < 1:
      raise ConfigError(f"train.{key}", f"must be >= 1, got {config.train[key]}")
  for mixer, rng in cells(config):
    try:
      models.family_config(model_config(config, mixer, rng))
    except ValueError as e:
      raise ConfigError("model", f"(mixer {mixer!r}, eigenvalue_range {rng!r}): {e}") from None


def cells(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(mixer, eigenvalue_range) pairs of the grid."""
  return list(itertools.product(config.task.mixers, config.task.eigenvalue_ranges))


def model_config(config: ml_collections.ConfigDict, mixer: str,
                 eigenvalue_range: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict(config.model.to_dict())
  m.mixer, m.eigenvalue_range = mixer, eigenvalue_range
  return m


def _hits_fn(graphdef) -> Callable:
  @jax.jit
  def hits(params, frozen, inputs, segment_ids, targets):
    logits = train_lib.merge_model(graphdef, params, frozen)(inputs, segment_ids)
    return jnp.argmax(logits, -1) == targets
  return hits


def evaluate(state, hits: Callable, modulus: int, lengths, n: int, seed: int,
             batch_size: int = 256) -> dict[int, float]:
  """Accuracy of the answer for strings of each length (one per example).

  The model is causal and the targets are running counts, so the prediction
  after the first L bits of a string of max(lengths) bits is the answer for a
  random string of L bits: one forward pass scores every length.
  """
  correct = np.zeros(max(lengths) + 1)
  for start in range(0, n, batch_size):
    rows = synthetic.examples(task(modulus, max(lengths)), seed, min(batch_size, n - start),
                              start)
    b = synthetic.batch(rows)
    correct += np.asarray(hits(state.params, state.frozen, b["inputs"], b["segment_ids"],
                               b["targets"])).sum(0)
  return {length: float(correct[length]) / n for length in lengths}


def train_cell(config: ml_collections.ConfigDict, modulus: int, mixer: str,
               eigenvalue_range: str, log: Callable[[str], Any] = print) -> dict:
  """Trains one model of the grid and scores it; returns a result row."""
  t, tk = config.train, config.task
  start = time.perf_counter()
  model_cfg = model_config(config, mixer, eigenvalue_range)
  model = models.build(model_cfg, rngs=nnx.Rngs(config.seed))
  graphdef, params, frozen = train_lib.split_model(model)
  tx, schedule = optim.make_optimizer(t)
  state = train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)))
  step = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, tx=tx,
                                   schedule=schedule, grad_accum=1, deterministic=True),
                 donate_argnums=0)
  data = synthetic.batches(task(modulus, tk.train_length), config.seed, t.batch_size,
                           tk.train_length + 1)
  losses = []
  for i in range(t.steps):
    state, metrics = step(state, next(data))
    if (i + 1) % t.log_every == 0 or i + 1 == t.steps:
      losses.append(float(metrics["loss"]))
      log(f"  mod {modulus} {mixer} {eigenvalue_range} step {i + 1}/{t.steps} "
          f"loss {losses[-1]:.4f}")
  train_s = time.perf_counter() - start
  lengths = (tk.train_length,) + tuple(tk.test_lengths)
  scores = evaluate(state, _hits_fn(graphdef), modulus, lengths, tk.eval_examples,
                    config.seed + 1)
  return {"task": synthetic.Counting(modulus=modulus).name, "modulus": modulus,
          "mixer": mixer, "eigenvalue_range": eigenvalue_range,
          "params": train_lib.count_params(params), "final_loss": losses[-1],
          "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - start, 1),
          "accuracy": {str(n): s for n, s in scores.items()}}


def run(config: ml_collections.ConfigDict, log: Callable[[str], Any] = print) -> list[dict]:
  """Every modulus x mixer x eigenvalue range of the config (compiled programs cached as
  ``train.compilation_cache_dir`` says; a relative path lies under ``runs/<name>``)."""
  validate(config)
  train_lib.enable_compilation_cache(config.train.get("compilation_cache_dir", ""),
                                     pathlib.Path("runs") / config.name)
  return [train_cell(config, k, mixer, rng, log)
          for k in config.task.moduli for mixer, rng in cells(config)]


def table(rows: list[dict], config: ml_collections.ConfigDict) -> str:
  """Markdown table: final-answer accuracy per length (train length first)."""
  tk = config.task
  lengths = (tk.train_length,) + tuple(tk.test_lengths)
  head = (["task", "layer", "eigenvalues"] + [f"n={n}" + (" (train)" if i == 0 else "")
                                               for i, n in enumerate(lengths)]
          + ["chance", "train s"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    acc = [f"{100 * r['accuracy'][str(n)]:.1f}%" for n in lengths]
    lines.append("| " + " | ".join(
        [r["task"], r["mixer"], r["eigenvalue_range"]] + acc
        + [f"{100 / r['modulus']:.1f}%", f"{r['train_s']:.0f}"]) + " |")
  return "\n".join(lines)
