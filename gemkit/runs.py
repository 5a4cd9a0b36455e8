"""Runs on disk: train one, load any, open a model to derive new runs from.

The plain functions behind the launchers (a notebook calls these directly).
:func:`load` rebuilds every kind of saved run (trained, quantized,
fine-tuned, a Hugging Face directory) through ``gemkit.surgery`` alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import ml_collections
from flax import nnx

import models
from gemkit import checkpoint as ckpt_lib
from gemkit import hf
from gemkit import metrics
from gemkit import sample as sample_lib
from gemkit import tokenizer as tokenizer_lib
from gemkit import train as train_lib
from gemkit.config import ConfigError
from gemkit.metrics import format_duration, format_flops
from gemkit.surgery import finetuned, lora, quantize


def default_workdir(config: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path("runs") / config.name


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Trains (or resumes) ``config`` in ``workdir``; prints and returns a summary."""
  workdir = pathlib.Path(workdir) if workdir else default_workdir(config)
  start = time.perf_counter()
  trainer = train_lib.Trainer(config, workdir)
  w = trainer.writer
  c = trainer.corpus
  w.print(f"gemkit: {config.name}  {trainer.num_params:,} parameters  "
          f"{metrics.machine()}  mesh "
          f"{dict(trainer.mesh.shape)}")
  w.print(f"corpus {config.data.source} {c.fingerprint}: {c.num_docs[0]} train docs "
          f"({c.train.num_bytes:,} bytes), {c.num_docs[1]} held-out docs "
          f"({c.heldout.num_bytes:,} bytes)")
  if trainer.resumed_from is not None:
    w.print(f"resumed from step {trainer.resumed_from} in {workdir}")
  try:
    logged = trainer.run()
    evals = [r for r in logged if r["split"] == "eval" and r["step"] == trainer.step]
    final = evals[-1] if evals else trainer.evaluate()
    model = trainer.model()
    text = sample_lib.generate(model, [config.train.sample_prompt], tokenizer=trainer.tokenizer,
                               max_new_tokens=config.train.sample_tokens, temperature=0.0)[0]
  finally:
    trainer.close()
  train_logs = [r for r in logged if r["split"] == "train"]
  elapsed = time.perf_counter() - start
  summary = {
      "workdir": str(workdir), "step": trainer.step, "elapsed_s": round(elapsed, 1),
      "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
      "heldout_loss": final["loss"], "heldout_bpb": final["bpb"],
      # The first window includes compilation; the median of the rest is the steady rate.
      "tokens_per_sec": (statistics.median(r["tokens_per_sec"] for r in train_logs[1:])
                         if len(train_logs) > 1 else None),
      "model_flops_per_token": trainer.flops_per_token,
      "sample": text,
  }
  rate = summary["tokens_per_sec"] or 0.0
  summary["model_flops_per_sec"] = rate * trainer.flops_per_token
  summary["mfu"] = (None if trainer.peak_flops is None
                    else summary["model_flops_per_sec"] / trainer.peak_flops)
  w.print("-" * 72)
  w.print(f"done: step {summary['step']} in {format_duration(elapsed)} | held-out loss "
          f"{final['loss']:.4f} nats/token, {final['bpb']:.4f} bits/byte | "
          f"{rate:,.0f} tokens/s, {trainer.flops_per_token / 1e6:,.1f} MFLOP/token, "
          f"{format_flops(summary['model_flops_per_sec'], summary['mfu'])}")
  w.print(f"greedy sample from {config.train.sample_prompt!r}:\n"
          f"{config.train.sample_prompt}{text}")
  return summary


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """(run directory, step or None for the latest) of a run dir, its checkpoints/ or a step dir."""
  p = pathlib.Path(path)
  if p.name.isdigit() and p.parent.name == "checkpoints":
    return p.parent.parent, int(p.name)
  if p.name == "checkpoints":
    return p.parent, None
  return p, None


def checkpoint_meta(path: str | pathlib.Path, step: int | None = None
                    ) -> tuple[pathlib.Path, int, dict]:
  """(run directory, step, recorded metadata) of a complete checkpoint.

  ``path`` as :func:`load`; ``step`` None: the one ``path`` names, else the
  latest. A ConfigError (key ``workdir``) when there is no such checkpoint.
  """
  workdir, at = resolve_checkpoint(path)
  step = at if step is None else step
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise ConfigError("workdir", f"no checkpoints under {workdir}")
  with ckpt_lib.Checkpointer(directory, async_save=False) as checkpointer:
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.all_steps():
      at_step = "" if step is None else f" {step}"
      raise ConfigError("workdir", f"no complete checkpoint{at_step} under {directory}")
    return workdir, step, checkpointer.meta(step)


def load(path: str | pathlib.Path, step: int | None = None):
  """(model, config) from a run directory's checkpoint (latest step by default),
  or from a Hugging Face model directory (``gemkit.hf.load``).

  ``path`` is a run directory, its ``checkpoints/`` or one step's
  ``checkpoints/<step>`` (that step, unless ``step`` is given), or a
  directory with a ``config.json`` and safetensors weights.

  The model is rebuilt from the model config recorded in the checkpoint, so
  it does not depend on the experiment file still being the same. A
  checkpoint written by ``launch.quantize`` records its quantization rules,
  and the model comes back quantized the same way (``gemkit.surgery.quantize``). A
  ``launch.finetune`` run comes back as its base with the fine-tuned
  parameters (quantization and adapters rebuilt: ``gemkit.surgery.finetuned``).
  """
  if hf.is_model_dir(path):
    model, config, _ = hf.load(path)
    return model, config
  return load_from_meta(*checkpoint_meta(path, step))


def load_tokenizer(path: str | pathlib.Path):
  """The tokenizer of a run (as recorded in it; bytes for runs that record
  none) or of a Hugging Face model directory (its tokenizer.json)."""
  if hf.is_model_dir(path):
    return tokenizer_lib.HFTokenizer.from_dir(path)
  return tokenizer_lib.for_run(resolve_checkpoint(path)[0])


def load_from_meta(workdir: pathlib.Path, step: int, meta: dict):
  """:func:`load` of the checkpoint whose :func:`checkpoint_meta` is already read."""
  config = (ml_collections.ConfigDict(json.loads(meta["config"])) if "config" in meta
            else None)
  if "finetune" in meta:
    return _load_finetuned(workdir, step, meta["finetune"]), config
  model_cfg = ml_collections.ConfigDict(meta["model"])
  quantization = meta.get("quantization")

  def build():
    model = models.build(model_cfg, rngs=nnx.Rngs(0))
    if quantization:
      model, _ = quantize.quantize_model(model, quantization["rules"])
    return model

  graphdef, _, frozen = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  with ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False) as checkpointer:
    saved = checkpointer.restore(step)
  if saved.get("frozen") is None and jax.tree.leaves(frozen):
    raise ConfigError("workdir", f"{workdir} holds only the trained parameters of a model "
                      "whose frozen part its launcher rebuilds")
  # A run started from weights (model.init_from) saves no frozen part: it has none.
  model = train_lib.merge_model(graphdef, saved["params"],
                                frozen if saved.get("frozen") is None else saved["frozen"])
  return model, config


def _load_finetuned(workdir: pathlib.Path, step: int, settings: dict) -> nnx.Module:
  """The model of a fine-tuning run's checkpoint: its base (the run or Hugging Face
  directory it records, checked by fingerprint), rebuilt by ``surgery.finetuned``,
  with the trained parameters restored. PiSSA's residual is recomputed from
  the base (the adapter checkpoint holds its saved factors)."""
  info = settings["base"]
  base, _ = load(info["workdir"], info["step"])
  fingerprint = lora.fingerprint(base)
  if fingerprint != info["fingerprint"]:
    raise ConfigError("base.workdir", f"{workdir} was fine-tuned from base {info['fingerprint']}"
                      f" ({info['workdir']} step {info['step']}), which now has fingerprint "
                      f"{fingerprint}")
  model, trainable = finetuned.build(base, fingerprint, settings)
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  with ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False) as checkpointer:
    restored = checkpointer.restore(step)
  nnx.replace_by_pure_dict(params, restored["params"])   # orbax keys are strings ("0")
  return nnx.merge(graphdef, params, frozen)


@dataclasses.dataclass
class Source:
  """A model to derive runs from (quantized copies, fine-tuning methods), with what
  evaluating and recording them needs.

  ``path``: the run or Hugging Face directory; ``step``: its checkpoint step
  (0 for a Hugging Face directory); ``config``: the experiment config (its
  ``data`` block is what held-out figures are measured on); ``meta``: the
  checkpoint metadata that derived checkpoints extend; ``tokenizer``: the
  model's.
  """

  path: str
  step: int
  model: nnx.Module
  config: ml_collections.ConfigDict
  meta: dict
  tokenizer: tokenizer_lib.Tokenizer


def load_source(path: str | pathlib.Path, step: int | None = None,
                run_config: ml_collections.ConfigDict | None = None) -> Source:
  """The :class:`Source` at ``path``: a run's checkpoint (``step``, default the latest)
  or a Hugging Face model directory.

  ``run_config`` (with a Hugging Face directory): the experiment config whose
  ``data`` the model is evaluated on, its ``model`` block resolved against
  the directory (``model.init_from``; run keys such as dtypes kept).
  """
  if hf.is_model_dir(path):
    config = copy.deepcopy(run_config) if run_config is not None else None
    if config is None:
      model, config, tokenizer = hf.load(path)
    else:
      with config.unlocked():
        config.model = hf.resolve_model_config({**config.model, "init_from": str(path)})
      model, tokenizer = hf.load_weights(config.model, path), load_tokenizer(path)
    meta = {"model": config.model.to_dict(), "config": config.to_json_best_effort()}
    return Source(str(path), 0, model, config, meta, tokenizer)
  workdir, step, meta = checkpoint_meta(path, step)
  model, config = load_from_meta(workdir, step, meta)
  if config is None:
    raise ConfigError("workdir", f"{workdir}: the checkpoint records no config")
  return Source(str(workdir), step, model, config, meta, load_tokenizer(workdir))
