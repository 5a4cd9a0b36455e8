"""Training: the jitted train step, evaluation and a resumable Trainer.

The train state is a plain pytree (params as a pure dict, optax state, step,
RNG key data), sharded over the mesh by the parameters' logical names; the
step donates all of it but the frozen part (which it only reads). A step
takes a global batch [B, T], splits it into ``grad_accum`` micro-batches
(``lax.scan``; none when it is 1), and applies one AdamW update with
the token-weighted mean gradient

    g = sum_m grad(sum_t mask * nll / N),    N = sum_m sum_t mask

so accumulation gives the same update as one big batch. The loss masks
padding and targets in another document than their input (packed segments).
Dropout keys are ``fold_in(rng, step)``, so a resumed run draws the same ones.
A step whose loss or gradient norm is not finite leaves the parameters and
optimizer state as they were (decided inside the jitted step, no host sync)
and is counted; ``train.max_nonfinite_steps`` such steps in a row stop the run
without saving, so the last checkpoint is the last good one.

``Trainer`` is the loop ``launch.train`` runs and notebooks drive:
``Trainer(config, workdir).run(steps=100)`` trains 100 more steps (resuming
from the workdir's last checkpoint, if any) and returns the logged metrics.
Fine-tuning (``gemkit.studies.finetune``) runs the same loop and step: it passes a
``model_fn`` (a trained base, maybe quantized, with LoRA adapters), a
``trainable`` filter (``nnx.LoRAParam``) and the task's ``data``.
On several processes (TPU pod workers, SLURM tasks) every process runs the
same Trainer: each reads its own rows of every global batch, and all of them
write their shards of each checkpoint. SIGTERM (a preemption notice) saves a
checkpoint at the next step boundary, agreed by all processes, and exits with
status 0; running the same command again resumes from it.

Compiled steps persist across processes in JAX's compilation cache
(``train.compilation_cache_dir``, :func:`enable_compilation_cache`), so a
restarted or resumed run, or a new one of the same shapes, skips XLA's
compile.
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import threading
import time
import zlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

import models
from gemkit import checkpoint as ckpt_lib
from gemkit import data as data_lib
from gemkit import flops as flops_lib
from gemkit import hf
from gemkit import metrics as metrics_lib
from gemkit import optim
from gemkit import sharding as sharding_lib
from gemkit import tokenizer as tokenizer_lib
from gemkit.config import ConfigError, validate
from gemkit.metrics import LN2



@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: train steps taken (batches consumed)
  params: Any            # pure dict of trainable parameters
  frozen: Any            # pure dict of non-trained variables (e.g. a frozen base)
  opt_state: Any
  rng: jax.Array         # uint32 key data
  nonfinite_run: Any = None    # int32 scalar: skipped (non-finite) steps in a row
  nonfinite_total: Any = None  # int32 scalar: skipped steps in all (None: not counted)


class NonFiniteError(FloatingPointError):
  """``train.max_nonfinite_steps`` steps in a row had a non-finite loss or gradient."""


class Preempted(SystemExit):
  """Raised by ``Trainer.run`` after SIGTERM, once the step is saved; exit status 0."""

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


def split_model(model: nnx.Module, trainable=nnx.Param):
  """(graphdef, trainable pure dict, frozen pure dict) of ``model``."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def merge_model(graphdef, params, frozen) -> nnx.Module:
  return nnx.merge(graphdef, params, frozen)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(target) per position, float32: [B, T, V], [B, T] -> [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _fold_in_path(path, key, shape):
  """nnx.reseed policy: each RNG stream gets ``key`` folded with a hash of its path."""
  del shape
  return jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF)


def _loss_sum(graphdef, params, frozen, batch, key, deterministic, denom):
  """sum_t mask * nll / denom of ``batch`` (denom: the whole step's target count)."""
  model = merge_model(graphdef, params, frozen)
  if not deterministic:   # dropout layers holding an RNG stream (LoRA adapters) use this key
    model = nnx.view(model, only=nnx.Dropout, deterministic=False, raise_if_not_found=False)
    nnx.reseed(model, dropout=key, policy=_fold_in_path)
  logits = model(batch["inputs"], batch["segment_ids"], deterministic=deterministic,
                 rngs=nnx.Rngs(dropout=key))
  return jnp.sum(token_nll(logits, batch["targets"]) * batch["loss_mask"]) / denom


def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, grad_accum: int, deterministic: bool):
  """One optimizer update on ``batch`` (arrays [B, T]); returns (state, metrics).

  The loss is divided by the batch's target count before differentiating,
  so the gradient comes out as the token mean (no pass over the gradients to
  divide them). ``grad_accum`` > 1 sums the micro-batches' gradients in a
  ``lax.scan``; 1 differentiates the batch directly (no scan, no zero
  accumulator). If the loss or the gradient norm is not finite the update is
  skipped (params and optimizer state unchanged, ``step`` still advances past
  the batch) and the state's non-finite counters, when present, count it.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  count = jnp.sum(batch["loss_mask"])
  denom = jnp.maximum(count, 1.0)
  loss_and_grad = jax.value_and_grad(
      lambda params, mb, mb_key: _loss_sum(graphdef, params, state.frozen, mb, mb_key,
                                           deterministic, denom))
  if grad_accum == 1:
    loss, grads = loss_and_grad(state.params, batch, jax.random.fold_in(key, 0))
  else:
    def accumulate(carry, inputs):
      i, mb = inputs
      ls, g = loss_and_grad(state.params, mb, jax.random.fold_in(key, i))
      return (jax.tree.map(jnp.add, carry[0], g), carry[1] + ls), None

    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss), _ = jax.lax.scan(accumulate, (zeros, 0.0),
                                    (jnp.arange(grad_accum), micro))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  skipped = jnp.logical_not(finite).astype(jnp.int32)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
             "tokens": count, "skipped": skipped}
  new_state = state.replace(step=state.step + 1,
                            params=keep_if_bad(params, state.params),
                            opt_state=keep_if_bad(opt_state, state.opt_state))
  if state.nonfinite_run is not None:
    new_state = new_state.replace(nonfinite_run=(state.nonfinite_run + 1) * skipped,
                                  nonfinite_total=state.nonfinite_total + skipped)
    metrics.update(nonfinite_run=new_state.nonfinite_run,
                   skipped_total=new_state.nonfinite_total)
  return new_state, metrics


def eval_step(params, frozen, batch, token_bytes=None, *, graphdef) -> dict:
  """Sums over a batch: nll and count of all targets; nll of the targets that stand
  for text and their bytes, ``token_bytes[targets]`` (the tokenizer's
  ``token_bytes()`` table, default the byte tokenizer's: 1 per byte, 0 for
  specials)."""
  if token_bytes is None:
    token_bytes = tokenizer_lib.ByteTokenizer().token_bytes()
  model = merge_model(graphdef, params, frozen)
  nll = token_nll(model(batch["inputs"], batch["segment_ids"]), batch["targets"])
  mask = batch["loss_mask"]
  target_bytes = jnp.asarray(token_bytes)[batch["targets"]]
  text = mask * (target_bytes > 0)
  return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
          "byte_nll": jnp.sum(nll * text), "bytes": jnp.sum(mask * target_bytes)}


def summarize_eval(sums: dict) -> dict:
  """loss (nats/token) and bits-per-byte (text targets' nll in bits / their bytes)."""
  return {"loss": sums["nll"] / max(sums["tokens"], 1),
          "bpb": sums["byte_nll"] / LN2 / max(sums["bytes"], 1),
          "eval_tokens": int(sums["tokens"])}


@functools.lru_cache(maxsize=None)
def _jit_eval_step(graphdef):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef))


def heldout_loss(graphdef, params, frozen, batches, token_bytes=None, *,
                 step_fn: Callable | None = None) -> dict:
  """:func:`summarize_eval` of :func:`eval_step` summed over ``batches``.

  The one held-out loop: ``Trainer.evaluate``, ``quantize.heldout_bpb`` and
  ``finetune.completion_loss`` all call it. ``token_bytes`` as for
  :func:`eval_step`. ``step_fn(params, frozen, batch, token_bytes)``: the
  jitted eval step (default: ``eval_step`` jitted for ``graphdef``; the
  Trainer passes its sharded one, with batches already on its mesh).
  """
  step_fn = step_fn or _jit_eval_step(graphdef)
  totals = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
  for batch in batches:
    sums = jax.device_get(step_fn(params, frozen, batch, token_bytes))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  return summarize_eval(totals)


USER_CACHE = "auto"     # train.compilation_cache_dir: the user's cache directory


def compilation_cache_path(setting: str, workdir: str | os.PathLike) -> pathlib.Path | None:
  """Where ``train.compilation_cache_dir`` = ``setting`` keeps compiled programs.

  "" is off (None); "auto" is the user's cache directory,
  ``$XDG_CACHE_HOME/gemkit/jax`` (default ``~/.cache/gemkit/jax``), shared by
  every run of this user; a relative path lies under ``workdir``; ``~``
  expands.
  """
  if not setting:
    return None
  if setting == USER_CACHE:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "gemkit" / "jax"
  path = pathlib.Path(setting).expanduser()
  return path if path.is_absolute() else pathlib.Path(workdir) / path


def enable_compilation_cache(setting: str, workdir: str | os.PathLike) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache at :func:`compilation_cache_path`.

  Process-wide (JAX has one cache): the last Trainer's setting wins, and ""
  leaves JAX's own (``JAX_COMPILATION_CACHE_DIR``, default off) alone. Every
  program that took at least 0.5 s to compile is kept (the train, eval and
  init steps; not the many tiny ones), whatever its size. Returns the
  directory, or None when off.
  """
  path = compilation_cache_path(setting, workdir)
  if path is None:
    return None
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if jax.config.jax_compilation_cache_dir != str(path):
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()   # JAX opens its cache once; reopen it at the new path
  return path


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Trainer:
  """Builds everything a run needs from a config and trains it, resumably.

  A run with a checkpoint in ``workdir`` is restored straight into this mesh's
  shardings (against ``abstract_state``), whatever mesh, device count or
  process count saved it; otherwise the state is initialized on the mesh.

  Args:
    config: a validated experiment ConfigDict.
    workdir: run directory; checkpoints under ``<workdir>/checkpoints``,
      metrics in ``<workdir>/metrics.jsonl``.
    writer: where progress goes (a MetricWriter is created if None).
    model_fn: builds the initial model (e.g. a trained base with adapters);
      default ``models.build(config.model)`` initialized from ``config.seed``.
      With a model_fn the frozen part is rebuilt by it at every start, so
      checkpoints hold only the trainable part and the optimizer state. The
      Trainer copies the trainable arrays once and only reads the frozen
      ones (they are not donated), so the returned model, and a base whose
      arrays it shares, stay usable and unchanged; ``model()`` is the
      trained one.
    trainable: nnx filter of the variables the optimizer trains (e.g.
      ``nnx.LoRAParam``); everything else is frozen (``TrainState.frozen``).
    data: the train and eval data instead of ``config.data``'s corpus: an
      object with ``fingerprint`` (str), ``train_dataset(batch_size, seed,
      process_index, process_count)`` (a Grain dataset of [B, T] batch
      dicts, its iterator checkpointable) and ``eval_batches(batch_size,
      max_rows)`` (e.g. ``gemkit.studies.finetune.TaskData``).
    meta: extra checkpoint metadata (JSON); must be equal to resume.
    tokenizer: encodes the corpus and counts the bytes of bits-per-byte
      (``gemkit.tokenizer``; default the byte tokenizer, or with
      ``model.init_from`` that directory's). Any other than the byte
      tokenizer is recorded in ``<workdir>/tokenizer/`` for ``gemkit.load``
      and the launchers.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               writer: metrics_lib.MetricWriter | None = None,
               model_fn: Callable[[], nnx.Module] | None = None,
               trainable: Any = nnx.Param, data: Any = None, meta: dict | None = None,
               tokenizer: tokenizer_lib.Tokenizer | None = None):
    validate(config)
    sharding_lib.initialize_distributed()   # a no-op unless this is one of several processes
    if config.model.get("init_from") and model_fn is None:
      model_fn = self._import_model(config)
      tokenizer = tokenizer or tokenizer_lib.HFTokenizer.from_dir(config.model.init_from)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.compilation_cache = enable_compilation_cache(
        config.train.get("compilation_cache_dir", ""), self.workdir)
    self.writer = writer or metrics_lib.MetricWriter(
        self.workdir, tensorboard=config.train.tensorboard,
        is_main=jax.process_index() == 0)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.check_batch(self.mesh, config.train.batch_size, config.data.seq_len)
    self._model_fn, self.trainable, self._task = model_fn, trainable, data
    self.extra_meta = dict(meta or {})
    self.tokenizer = tokenizer_lib.resolve(tokenizer)
    if not isinstance(self.tokenizer, tokenizer_lib.ByteTokenizer) and jax.process_index() == 0:
      tokenizer_lib.save_for_run(self.tokenizer, self.workdir)   # gemkit.load / launchers
    self.corpus = (data_lib.Corpus.from_config(config.data, self.tokenizer) if data is None
                   else data)
    self.tx, self.schedule = optim.make_optimizer(config.train)
    init = self._build_state()
    if data is None:
      self.data = data_lib.train_dataset(self.corpus, config.data, config.train.batch_size,
                                         config.seed, jax.process_index(), jax.process_count())
    else:
      self.data = data.train_dataset(config.train.batch_size, config.seed,
                                     jax.process_index(), jax.process_count())
    self.data_iter = iter(self.data)
    self.checkpointer = ckpt_lib.Checkpointer(
        self.workdir / "checkpoints", keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoint)
    self.resumed_from = self._maybe_restore()
    if self.resumed_from is None:
      with sharding_lib.activate(self.mesh):
        self.state = init()
    self._compile()
    self.history: list[dict] = []

  # -- construction ---------------------------------------------------------

  def _import_model(self, config: ml_collections.ConfigDict) -> Callable[[], nnx.Module]:
    """For ``model.init_from`` (a Hugging Face directory): sets ``config.model`` to
    the directory's architecture (``gemkit.hf.resolve_model_config``) and returns
    the loader of its weights, placed on this run's mesh."""
    with config.unlocked():
      config.model = hf.resolve_model_config(config.model)
    validate(config)
    return lambda: hf.load_weights(config.model, config.model.init_from, mesh=self.mesh)

  def _build_state(self) -> Callable[[], TrainState]:
    """Sets the state's shardings and abstract shapes; returns the jitted initializer."""
    cfg = self.config
    if self._model_fn is None:
      abstract = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0)))
      built = None
    else:
      abstract = self._model_fn()
      built = split_model(abstract, self.trainable)[1:]
    graphdef, params_state, frozen_state = nnx.split(abstract, self.trainable, ...)
    self.graphdef = graphdef
    # Dropout layers with their own RNG stream (adapters) need the non-deterministic step too.
    self.deterministic = cfg.model.dropout_rate == 0.0 and not any(
        isinstance(m, nnx.Dropout) and m.rate > 0 and m.rngs is not None
        for _, m in nnx.iter_modules(abstract))
    param_sh = nnx.to_pure_dict(sharding_lib.param_shardings(params_state, self.mesh))
    frozen_sh = nnx.to_pure_dict(sharding_lib.param_shardings(frozen_state, self.mesh))

    def init(seed, built):
      if built is None:
        model = models.build(cfg.model, rngs=nnx.Rngs(seed))
        _, params, frozen = split_model(model, self.trainable)
      else:
        params, frozen = built
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                        opt_state=self.tx.init(params),
                        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
                        nonfinite_run=jnp.zeros((), jnp.int32),
                        nonfinite_total=jnp.zeros((), jnp.int32))

    with sharding_lib.activate(self.mesh):
      shapes = jax.eval_shape(functools.partial(init, cfg.seed), built)
      replicated = sharding_lib.logical_sharding(self.mesh, None)
      # Optimizer moments mirror the params' shardings; optax counters are replicated.
      opt_sh = optax.tree_map_params(self.tx, lambda _, sh: sh, shapes.opt_state, param_sh,
                                     transform_non_params=lambda _: replicated)
      self.state_sharding = TrainState(step=replicated, params=param_sh, frozen=frozen_sh,
                                       opt_state=opt_sh, rng=replicated,
                                       nonfinite_run=replicated, nonfinite_total=replicated)
    # What a restore fills in: shapes, dtypes and this mesh's shardings (no memory).
    self.abstract_state = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        shapes, self.state_sharding)
    self.num_params = count_params(shapes.params) + count_params(shapes.frozen)
    self.num_trainable = count_params(shapes.params)
    self.flops_per_token = flops_lib.train_flops_per_token(abstract, cfg.data.seq_len)
    self.peak_flops = metrics_lib.peak_flops()
    if built is None:
      return lambda: jax.jit(functools.partial(init, cfg.seed),
                             out_shardings=self.state_sharding)(None)
    # The frozen part stays the model_fn's arrays (no copy: the step only reads it);
    # checkpoints leave it out. The trained part is copied once (the step donates it).
    self._frozen = jax.device_put(built[1], frozen_sh)
    copied = lambda params: (jax.tree.map(jnp.copy, params), None)
    init_trained = jax.jit(lambda params: init(cfg.seed, copied(params)),
                           out_shardings=self.state_sharding.replace(frozen=None))
    return lambda: init_trained(built[0]).replace(frozen=self._frozen)

  def _compile(self) -> None:
    cfg = self.config
    step = functools.partial(train_step, graphdef=self.graphdef, tx=self.tx,
                             schedule=self.schedule, grad_accum=cfg.train.grad_accum,
                             deterministic=self.deterministic)
    batch_sh = sharding_lib.batch_sharding(self.mesh)
    replicated = sharding_lib.logical_sharding(self.mesh, None)  # scalars every process reads
    # The step donates the trained part of the state; the frozen part (a model_fn's base,
    # which callers may still hold) is a separate argument, read and never donated.
    trained_sh = self.state_sharding.replace(frozen=None)

    def split_step(trained, frozen, batch):
      new, metrics = step(trained.replace(frozen=frozen), batch)
      return new.replace(frozen=None), metrics

    self._jit_step = jax.jit(split_step, donate_argnums=0,
                             in_shardings=(trained_sh, self.state_sharding.frozen, batch_sh),
                             out_shardings=(trained_sh, replicated))

    def train_step_fn(state: TrainState, batch: dict):
      new, metrics = self._jit_step(state.replace(frozen=None), state.frozen, batch)
      return new.replace(frozen=state.frozen), metrics

    self._train_step = train_step_fn
    self._eval_step = jax.jit(functools.partial(eval_step, graphdef=self.graphdef),
                              in_shardings=(self.state_sharding.params,
                                            self.state_sharding.frozen, batch_sh, replicated),
                              out_shardings=replicated)
    self.batch_sharding = batch_sh

  def meta(self) -> dict:
    cfg = self.config
    return {"model": cfg.model.to_dict(), "data": _data_identity(cfg),
            "corpus_fingerprint": self.corpus.fingerprint, "config": cfg.to_json_best_effort(),
            "num_params": self.num_params, **self.extra_meta}

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
    for key, value in self.extra_meta.items():
      if saved.get(key) != value:
        raise ConfigError(key, f"{where} holds a checkpoint of another {key} (checkpoint: "
                          f"{saved.get(key)!r}, now: {value!r}); use another --workdir")
    if self._model_fn is None:
      self.state = self.checkpointer.restore(step, self.abstract_state, self.data_iter)
    else:
      state = self.checkpointer.restore(step, self.abstract_state.replace(frozen=None),
                                        self.data_iter)
      self.state = state.replace(frozen=self._frozen)
    self.writer.truncate_after(step)
    return step

  # -- running --------------------------------------------------------------

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def model(self) -> nnx.Module:
    """The current model (parameters merged into the NNX module)."""
    return merge_model(self.graphdef, self.state.params, self.state.frozen)

  @property
  def skipped_steps(self) -> int:
    """Steps skipped so far because their loss or gradients were not finite."""
    return int(jax.device_get(self.state.nonfinite_total))

  def _device_batch(self, batch: dict) -> dict:
    """Global arrays [B, T] from this process's rows (a train batch: B / processes
    rows) or from the whole batch that every process holds (an eval batch)."""
    if jax.process_count() == 1:
      return jax.device_put(batch, self.batch_sharding)
    rows = self.config.train.batch_size
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v,
                                                      (rows,) + v.shape[1:])
            for k, v in batch.items()}

  def evaluate(self, max_windows: int | None = None) -> dict:
    """Held-out loss and bits-per-byte over disjoint windows of seq_len."""
    d, t = self.config.data, self.config.train
    n = max_windows or d.eval_windows
    batches = (data_lib.eval_batches(self.corpus.heldout, d.seq_len, t.batch_size, n)
               if self._task is None else self._task.eval_batches(t.batch_size, n))
    with sharding_lib.activate(self.mesh):
      return heldout_loss(self.graphdef, self.state.params, self.state.frozen,
                          map(self._device_batch, batches), self.tokenizer.token_bytes(),
                          step_fn=self._eval_step)

  def save(self, force: bool = False) -> None:
    state = self.state if self._model_fn is None else self.state.replace(frozen=None)
    self.checkpointer.save(self.step, state, self.meta(), self.data_iter, force=force)

  def step_memory(self) -> dict:
    """XLA's memory analysis of the compiled train step, bytes (compiles it once more).

    ``peak_memory_in_bytes`` is the compiler's peak of live buffers
    (arguments, outputs and temporaries) of one step on this backend.
    """
    shape = (self.config.train.batch_size, self.config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
             for k, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                              ("segment_ids", jnp.int32), ("loss_mask", jnp.float32))}
    with sharding_lib.activate(self.mesh):
      stats = self._jit_step.lower(self.abstract_state.replace(frozen=None),
                                   self.abstract_state.frozen, batch).compile().memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "peak_memory_in_bytes")
    return {k: int(getattr(stats, k)) for k in keys if stats is not None and hasattr(stats, k)}

  def run(self, steps: int | None = None) -> list[dict]:
    """Trains ``steps`` more steps (default: up to ``train.steps``); returns logged metrics.

    Checkpoints every ``train.checkpoint_every`` steps and at the end. SIGTERM
    or Ctrl-C stop the run at the next step boundary with a checkpoint of
    that step: SIGTERM then raises :class:`Preempted` (exit status 0), Ctrl-C
    ``KeyboardInterrupt`` (a second Ctrl-C aborts at once, without saving).
    ``train.max_nonfinite_steps`` non-finite steps in a row raise
    :class:`NonFiniteError` without saving.
    """
    t = self.config.train
    start = self.step
    end = t.steps if steps is None else start + steps
    tokens_per_step = t.batch_size * self.config.data.seq_len
    logged: list[dict] = []
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    previous = None
    with _StopSignals() as stop, sharding_lib.activate(self.mesh):
      for step in range(start, end):
        batch = self._device_batch(next(self.data_iter))
        self.state, metrics = self._train_step(self.state, batch)
        done = step + 1
        if previous is not None:      # the step before has (nearly) finished: no stall
          self._check_finite(*previous)
        previous = (done, metrics)
        window_steps += 1
        if done % t.log_every == 0 or done == end:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          rate = window_steps * tokens_per_step / (now - window_start)
          window_start, window_steps = now, 0
          eta = (end - done) * tokens_per_step / rate
          flops = rate * self.flops_per_token
          record = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                    "lr": metrics["lr"], "tokens_per_sec": rate, "model_flops_per_sec": flops,
                    "mfu": None if self.peak_flops is None else flops / self.peak_flops,
                    "skipped_steps": int(metrics["skipped_total"])}
          self.writer.write(done, "train", record)
          logged.append({"step": done, "split": "train", **record})
          skipped = f"  skipped {record['skipped_steps']}" if record["skipped_steps"] else ""
          self.writer.progress(
              f"step {done}/{end}  loss {metrics['loss']:.4f}  "
              f"{rate:,.0f} tok/s  {metrics_lib.format_flops(flops, record['mfu'])}"
              f"  elapsed {metrics_lib.format_duration(now - run_start)}"
              f"  ETA {metrics_lib.format_duration(eta)}{skipped}")
        if done % t.eval_every == 0 or done == end:
          ev = self.evaluate()
          self.writer.write(done, "eval", ev)
          logged.append({"step": done, "split": "eval", **ev})
          self.writer.print(f"eval @ {done}: loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
        saved = done % t.checkpoint_every == 0 or done == end
        if saved:
          self._check_finite(done, metrics)
          self.save()
        if stop.requested(done):
          self._check_finite(done, metrics)
          self.writer.print(f"{stop.reason}: saving step {done} to "
                            f"{self.checkpointer.directory}; run the same command to resume")
          if not saved:
            self.save(force=True)
          self.checkpointer.wait()
          self.history += logged
          stop.raise_exit(done)
      if previous is not None:
        self._check_finite(*previous)
    self.checkpointer.wait()
    self.history += logged
    return logged

  def _check_finite(self, step: int, metrics: dict) -> None:
    """NonFiniteError once ``train.max_nonfinite_steps`` steps in a row were skipped."""
    limit = self.config.train.get("max_nonfinite_steps", 0)
    if not limit:
      return
    in_a_row = int(jax.device_get(metrics["nonfinite_run"]))
    if in_a_row < limit:
      return
    self.checkpointer.wait()
    last = self.checkpointer.latest_step()
    raise NonFiniteError(
        f"the loss or gradients were not finite for {in_a_row} steps in a row (steps "
        f"{step - in_a_row + 1}..{step}, train.max_nonfinite_steps={limit}); stopped "
        f"without saving: the last checkpoint is step {last} in {self.checkpointer.directory}")

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


class _StopSignals:
  """SIGTERM and Ctrl-C as a request to stop at the next step boundary.

  One process: Python handlers note the signal (a second Ctrl-C raises
  KeyboardInterrupt at once). Several processes: jax's preemption service
  (started by ``jax.distributed.initialize``) catches SIGTERM on any of them
  and ``reached_preemption_sync_point`` turns True on all of them at the same
  step, so they save that step together; Ctrl-C keeps its default there.
  """

  def __init__(self):
    self.signum: int | None = None
    self.coordinated = jax.process_count() > 1
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "_StopSignals":
    if not self.coordinated and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._note)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

  def _note(self, signum, frame) -> None:
    del frame
    self.signum = signum
    if signum == signal.SIGINT:   # a second Ctrl-C aborts at once
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def requested(self, step: int) -> bool:
    if self.coordinated:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = signal.SIGTERM
      except RuntimeError:   # jax's preemption service is disabled
        pass
    return self.signum is not None

  @property
  def reason(self) -> str:
    return "preempted (SIGTERM)" if self.signum == signal.SIGTERM else "interrupted"

  def raise_exit(self, step: int) -> None:
    if self.signum == signal.SIGTERM:
      raise Preempted(step)
    raise KeyboardInterrupt(f"interrupted at step {step}")


def _data_identity(cfg) -> dict:
  """The data settings that fix the batch sequence (must match to resume)."""
  d = cfg.data
  return {"source": d.source, "path": d.path, "seq_len": d.seq_len,
          "heldout_fraction": d.heldout_fraction, "batch_size": cfg.train.batch_size,
          "seed": cfg.seed}
