"""Training: the jitted train step, evaluation and a resumable Trainer.

The train state is a plain pytree (params as a pure dict, optax state, step,
RNG key data), sharded over the mesh by the parameters' logical names and
donated to the step. A step takes a global batch [B, T], splits it into
``grad_accum`` micro-batches (``lax.scan``), and applies one AdamW update with
the token-weighted mean gradient

    g = sum_m grad(sum_t mask * nll) / sum_m sum_t mask

so accumulation gives the same update as one big batch. The loss masks
padding and targets in another document than their input (packed segments).
Dropout keys are ``fold_in(rng, step)``, so a resumed run draws the same ones.

``Trainer`` is the loop ``launch.train`` runs and notebooks drive:
``Trainer(config, workdir).run(steps=100)`` trains 100 more steps (resuming
from the workdir's last checkpoint, if any) and returns the logged metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import signal
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import models
from gemkit import checkpoint as ckpt_lib
from gemkit import data as data_lib
from gemkit import metrics as metrics_lib
from gemkit import optim
from gemkit import sharding as sharding_lib
from gemkit.config import ConfigError, validate

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer updates done
  params: Any            # pure dict of trainable parameters
  frozen: Any            # pure dict of non-trained variables (e.g. a frozen base)
  opt_state: Any
  rng: jax.Array         # uint32 key data


def split_model(model: nnx.Module, trainable=nnx.Param):
  """(graphdef, trainable pure dict, frozen pure dict) of ``model``."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def merge_model(graphdef, params, frozen) -> nnx.Module:
  return nnx.merge(graphdef, params, frozen)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(target) per position, float32: [B, T, V], [B, T] -> [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _loss_sums(graphdef, params, frozen, batch, key, deterministic):
  model = merge_model(graphdef, params, frozen)
  logits = model(batch["inputs"], batch["segment_ids"], deterministic=deterministic,
                 rngs=nnx.Rngs(dropout=key))
  mask = batch["loss_mask"]
  return jnp.sum(token_nll(logits, batch["targets"]) * mask), jnp.sum(mask)


def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, grad_accum: int, deterministic: bool):
  """One optimizer update on ``batch`` (arrays [B, T]); returns (state, metrics)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

  def loss_fn(params, mb, mb_key):
    loss_sum, count = _loss_sums(graphdef, params, state.frozen, mb, mb_key, deterministic)
    return loss_sum, count

  def accumulate(carry, inputs):
    grads, loss_sum, count = carry
    i, mb = inputs
    (ls, n), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, mb, jax.random.fold_in(key, i))
    return (jax.tree.map(jnp.add, grads, g), loss_sum + ls, count + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, loss_sum, count), _ = jax.lax.scan(
      accumulate, (zeros, 0.0, 0.0), (jnp.arange(grad_accum), micro))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
             "lr": schedule(state.step), "tokens": count}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, frozen, batch, *, graphdef) -> dict:
  """Sums over a batch: nll and count of all targets, and of byte targets."""
  model = merge_model(graphdef, params, frozen)
  nll = token_nll(model(batch["inputs"], batch["segment_ids"]), batch["targets"])
  mask = batch["loss_mask"]
  byte = mask * (batch["targets"] < 256)
  return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
          "byte_nll": jnp.sum(nll * byte), "bytes": jnp.sum(byte)}


def summarize_eval(sums: dict) -> dict:
  """loss (nats/token) and bits-per-byte (byte targets' nll in bits / bytes)."""
  return {"loss": sums["nll"] / max(sums["tokens"], 1),
          "bpb": sums["byte_nll"] / LN2 / max(sums["bytes"], 1),
          "eval_tokens": int(sums["tokens"])}


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Trainer:
  """Builds everything a run needs from a config and trains it, resumably.

  Args:
    config: a validated experiment ConfigDict.
    workdir: run directory; checkpoints under ``<workdir>/checkpoints``,
      metrics in ``<workdir>/metrics.jsonl``.
    log: where progress goes (a MetricWriter is created if None).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               writer: metrics_lib.MetricWriter | None = None):
    validate(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.writer = writer or metrics_lib.MetricWriter(
        self.workdir, tensorboard=config.train.tensorboard,
        is_main=jax.process_index() == 0)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.corpus = data_lib.Corpus.from_config(config.data)
    self.tx, self.schedule = optim.make_optimizer(config.train)
    self._build_state()
    self.data = data_lib.train_dataset(self.corpus, config.data, config.train.batch_size,
                                       config.seed, jax.process_index(), jax.process_count())
    self.data_iter = iter(self.data)
    self.checkpointer = ckpt_lib.Checkpointer(
        self.workdir / "checkpoints", keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoint)
    self.resumed_from = self._maybe_restore()
    self._compile()
    self.history: list[dict] = []

  # -- construction ---------------------------------------------------------

  def _build_state(self) -> None:
    cfg = self.config
    abstract = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params_state, frozen_state = nnx.split(abstract, nnx.Param, ...)
    self.graphdef = graphdef
    param_sh = nnx.to_pure_dict(sharding_lib.param_shardings(params_state, self.mesh))
    frozen_sh = nnx.to_pure_dict(sharding_lib.param_shardings(frozen_state, self.mesh))

    def init(seed):
      model = models.build(cfg.model, rngs=nnx.Rngs(seed))
      _, params, frozen = split_model(model)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                        opt_state=self.tx.init(params),
                        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)))

    with sharding_lib.activate(self.mesh):
      shapes = jax.eval_shape(functools.partial(init, cfg.seed))
      replicated = sharding_lib.logical_sharding(self.mesh, None)
      # Optimizer moments mirror the params' shardings; optax counters are replicated.
      opt_sh = optax.tree_map_params(self.tx, lambda _, sh: sh, shapes.opt_state, param_sh,
                                     transform_non_params=lambda _: replicated)
      self.state_sharding = TrainState(step=replicated, params=param_sh, frozen=frozen_sh,
                                       opt_state=opt_sh, rng=replicated)
      self.state = jax.jit(functools.partial(init, cfg.seed),
                           out_shardings=self.state_sharding)()
    self.num_params = count_params(self.state.params) + count_params(self.state.frozen)

  def _compile(self) -> None:
    cfg = self.config
    step = functools.partial(train_step, graphdef=self.graphdef, tx=self.tx,
                             schedule=self.schedule, grad_accum=cfg.train.grad_accum,
                             deterministic=cfg.model.dropout_rate == 0.0)
    batch_sh = sharding_lib.batch_sharding(self.mesh)
    self._train_step = jax.jit(step, donate_argnums=0,
                               in_shardings=(self.state_sharding, batch_sh),
                               out_shardings=(self.state_sharding, None))
    self._eval_step = jax.jit(functools.partial(eval_step, graphdef=self.graphdef),
                              in_shardings=(self.state_sharding.params,
                                            self.state_sharding.frozen, batch_sh))
    self.batch_sharding = batch_sh

  def meta(self) -> dict:
    cfg = self.config
    return {"model": cfg.model.to_dict(), "data": _data_identity(cfg),
            "corpus_fingerprint": self.corpus.fingerprint, "config": cfg.to_json_best_effort(),
            "num_params": self.num_params}

  def _maybe_restore(self) -> int | None:
    step = self.checkpointer.latest_step()
    if step is None:
      return None
    saved = self.checkpointer.meta(step)
    where = str(self.workdir)
    ckpt_lib.check_compatible(saved["model"], self.config.model.to_dict(), where, "model")
    ckpt_lib.check_compatible(saved["data"], _data_identity(self.config), where, "data")
    if saved.get("corpus_fingerprint") != self.corpus.fingerprint:
      raise ConfigError("data", f"{where} was trained on corpus "
                        f"{saved.get('corpus_fingerprint')}, this one is "
                        f"{self.corpus.fingerprint}: resuming would not be exact")
    self.state = self.checkpointer.restore(step, self.state, self.data_iter)
    self.writer.truncate_after(step)
    return step

  # -- running --------------------------------------------------------------

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def model(self) -> nnx.Module:
    """The current model (parameters merged into the NNX module)."""
    return merge_model(self.graphdef, self.state.params, self.state.frozen)

  def _device_batch(self, batch: dict) -> dict:
    return jax.make_array_from_process_local_data(self.batch_sharding, batch) \
        if jax.process_count() > 1 else jax.device_put(batch, self.batch_sharding)

  def evaluate(self, max_windows: int | None = None) -> dict:
    """Held-out loss and bits-per-byte over disjoint windows of seq_len."""
    d, t = self.config.data, self.config.train
    n = max_windows or d.eval_windows
    totals = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
    with sharding_lib.activate(self.mesh):
      for batch in data_lib.eval_batches(self.corpus.heldout, d.seq_len, t.batch_size, n):
        sums = jax.device_get(self._eval_step(self.state.params, self.state.frozen,
                                              self._device_batch(batch)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return summarize_eval(totals)

  def save(self, force: bool = False) -> None:
    self.checkpointer.save(self.step, self.state, self.meta(), self.data_iter, force=force)

  def run(self, steps: int | None = None) -> list[dict]:
    """Trains ``steps`` more steps (default: up to ``train.steps``); returns logged metrics.

    Checkpoints every ``train.checkpoint_every`` steps and at the end; on
    Ctrl-C (or SIGTERM) it saves the current step before re-raising.
    """
    t = self.config.train
    start = self.step
    end = t.steps if steps is None else start + steps
    tokens_per_step = t.batch_size * self.config.data.seq_len
    logged: list[dict] = []
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) \
        if _on_main_thread() else None
    try:
      with sharding_lib.activate(self.mesh):
        for step in range(start, end):
          batch = self._device_batch(next(self.data_iter))
          self.state, metrics = self._train_step(self.state, batch)
          window_steps += 1
          done = step + 1
          if done % t.log_every == 0 or done == end:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            rate = window_steps * tokens_per_step / (now - window_start)
            window_start, window_steps = now, 0
            eta = (end - done) * tokens_per_step / rate
            record = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                      "lr": metrics["lr"], "tokens_per_sec": rate}
            self.writer.write(done, "train", record)
            logged.append({"step": done, "split": "train", **record})
            self.writer.progress(
                f"step {done}/{end}  loss {metrics['loss']:.4f}  "
                f"{rate:,.0f} tok/s  elapsed {metrics_lib.format_duration(now - run_start)}"
                f"  ETA {metrics_lib.format_duration(eta)}")
          if done % t.eval_every == 0 or done == end:
            ev = self.evaluate()
            self.writer.write(done, "eval", ev)
            logged.append({"step": done, "split": "eval", **ev})
            self.writer.print(f"eval @ {done}: loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
          if done % t.checkpoint_every == 0 or done == end:
            self.save()
    except KeyboardInterrupt:
      self.writer.print(f"interrupted: saving step {self.step} to {self.checkpointer.directory}")
      self.save(force=True)
      self.checkpointer.wait()
      raise
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    self.checkpointer.wait()
    self.history += logged
    return logged

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def _on_main_thread() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def _data_identity(cfg) -> dict:
  """The data settings that fix the batch sequence (must match to resume)."""
  d = cfg.data
  return {"source": d.source, "path": d.path, "seq_len": d.seq_len,
          "heldout_fraction": d.heldout_fraction, "batch_size": cfg.train.batch_size,
          "seed": cfg.seed}
