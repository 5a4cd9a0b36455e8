"""The quantization study: quantized run directories of a model, and their held-out bpb.

  python -m launch.quantize --workdir=runs/lm_tiny --formats=int8,int4-g128,nf4

:func:`quantize_run` takes a ``gemkit.runs.Source`` (a trained run or a
Hugging Face directory) and a list of formats (``gemkit.surgery.quantize``
spec strings, or ``(label, rules)`` for mixed precision). Each format is
applied by ``surgery.quantize.quantize_model``, saved as a run directory that
``gemkit.runs.load`` rebuilds, and scored like ``Trainer.evaluate`` scores the
float model, so the rows compare like for like.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemkit import checkpoint as ckpt_lib
from gemkit import data as data_lib
from gemkit import metrics
from gemkit import runs
from gemkit import tokenizer as tokenizer_lib
from gemkit import train as train_lib
from gemkit.config import ConfigError
from gemkit.surgery import paths
from gemkit.surgery.quantize import Rules, default_rules, quantize_model, rules_to_json

FLOAT = "float"           # the label of the unquantized baseline row


def heldout_bpb(model: nnx.Module, config, *, max_windows: int | None = None,
                batch_size: int | None = None, corpus: data_lib.Corpus | None = None,
                tokenizer: tokenizer_lib.Tokenizer | None = None) -> dict:
  """Held-out loss and bits-per-byte of ``model`` as ``Trainer.evaluate`` computes them.

  Disjoint windows of ``config.data.seq_len`` over the run's held-out
  documents, the first ``max_windows`` (default ``config.data.eval_windows``),
  so the float model scores what its training log reports. ``corpus``: the
  run's (default: built from ``config.data`` with ``tokenizer``, whose
  ``token_bytes`` count the bytes; default the byte tokenizer).
  """
  graphdef, params, frozen = train_lib.split_model(model)
  tokenizer = tokenizer_lib.resolve(tokenizer)
  corpus = corpus or data_lib.Corpus.from_config(config.data, tokenizer)
  batches = data_lib.eval_batches(corpus.heldout, config.data.seq_len,
                                  batch_size or config.train.batch_size,
                                  max_windows or config.data.eval_windows)
  return train_lib.heldout_loss(graphdef, params, frozen, batches,
                                jnp.asarray(tokenizer.token_bytes()))


def save_model(model: nnx.Module, workdir: str | pathlib.Path, step: int, meta: dict) -> int:
  """Writes ``model``'s parameters as a run directory ``gemkit.runs.load`` reads.

  The state item holds ``{"params", "frozen"}`` only (no optimizer state).
  Returns the bytes the step directory takes on disk.
  """
  _, params, frozen = train_lib.split_model(model)
  with ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", keep=1,
                             async_save=False) as checkpointer:
    checkpointer.save(step, {"params": params, "frozen": frozen}, meta, force=True)
  return disk_bytes(pathlib.Path(workdir) / "checkpoints" / str(step))


def disk_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def quantize_run(source: runs.Source, formats: Sequence[str | tuple[str, Rules]], *,
                 out_dir: str | pathlib.Path | None = None,
                 keep_float: str = r"(.*/)?head", eval_windows: int | None = None,
                 batch_size: int | None = None, impl: str = "auto", save: bool = True,
                 overwrite: bool = False, log=print) -> dict:
  """Quantizes ``source.model`` to each of ``formats`` and measures held-out bpb.

  The held-out split is ``source.config.data``'s, encoded with
  ``source.tokenizer``, which every quantized run directory records (a
  Hugging Face source: its tokenizer on the experiment's data).

  A format is a spec string, which every Dense layer not matching
  ``keep_float`` takes, or a ``(label, rules)`` pair (mixed precision). With
  ``save``, ``<out_dir>/<label>/`` (default ``out_dir``: ``<workdir>_quant``)
  becomes a run directory of the quantized model, and ``<out_dir>/float/`` of
  the float parameters alone (the like-for-like size baseline); default
  ``out_dir``: ``<source.path>_quant``. Returns a
  report: one row per format (bytes of the Dense weights as stored and vs
  bf16, checkpoint bytes on disk, held-out loss and bpb, relative change of
  bpb vs float) plus the per-layer reports. ConfigError names a bad format.
  """
  workdir = pathlib.Path(source.path)
  out_dir = pathlib.Path(out_dir) if out_dir else workdir.with_name(workdir.name + "_quant")
  rules = {}
  for fmt in formats:
    label, fmt_rules = fmt if isinstance(fmt, tuple) else (fmt, default_rules(fmt, keep_float))
    if label != FLOAT:
      try:
        rules[label] = rules_to_json(fmt_rules)
      except ValueError as e:
        raise ConfigError("formats", str(e)) from None
  labels = list(rules)
  model, config, meta, tokenizer = source.model, source.config, source.meta, source.tokenizer
  source_step = source.step
  if meta.get("quantization"):
    raise ConfigError("workdir", f"{workdir} is already quantized "
                      f"({meta['quantization']['format']}); quantize a float run")
  for label in labels:  # every format is checked on the real shapes before any work
    try:
      nnx.eval_shape(lambda m, r=rules[label]: quantize_model(m, r, impl=impl)[0], model)
    except ValueError as e:
      raise ConfigError("formats", f"{label}: {e}") from None
  if save:
    targets = [out_dir / name for name in [FLOAT] + labels]
    taken = [str(t) for t in targets if (t / "checkpoints").exists()]
    if taken and not overwrite:
      raise ConfigError("out_dir", f"{taken[0]} already holds checkpoints; pass "
                        "--overwrite or another --out_dir")
    for t in targets:
      shutil.rmtree(t / "checkpoints", ignore_errors=True)

  windows = eval_windows or config.data.eval_windows
  corpus = data_lib.Corpus.from_config(config.data, tokenizer)
  kernels = [d.kernel[...] for _, d in paths.dense_layers(model)]
  n_dense, dense_elems = len(kernels), sum(k.size for k in kernels)
  rows, per_layer = [], {}

  def measure(label, qmodel, dense_bytes, n_quant, err, extra_meta):
    t0 = time.perf_counter()
    ev = heldout_bpb(qmodel, config, max_windows=windows, batch_size=batch_size, corpus=corpus,
                     tokenizer=tokenizer)
    row = {"format": label, "quantized_layers": f"{n_quant}/{n_dense}",
           "dense_bytes": dense_bytes, "dense_vs_bf16": dense_bytes / (2 * dense_elems),
           "weight_rel_err": err, "heldout_loss": ev["loss"], "heldout_bpb": ev["bpb"],
           "eval_tokens": ev["eval_tokens"], "eval_s": round(time.perf_counter() - t0, 1)}
    if save:
      row["disk_bytes"] = save_model(qmodel, out_dir / label, source_step,
                                     {**meta, **extra_meta})
      if not isinstance(tokenizer, tokenizer_lib.ByteTokenizer):
        tokenizer_lib.save_for_run(tokenizer, out_dir / label)
      row["run_dir"] = str(out_dir / label)
    base = rows[0]["heldout_bpb"] if rows else ev["bpb"]
    row["bpb_rel_change"] = ev["bpb"] / base - 1.0
    rows.append(row)
    log(format_row(row, header=len(rows) == 1))

  measure(FLOAT, model, sum(k.nbytes for k in kernels), 0, 0.0, {})
  for label in labels:
    qmodel, report = quantize_model(model, rules[label], impl=impl)
    per_layer[label] = [r.as_dict() for r in report]
    kept = sum(d.kernel[...].nbytes for _, d in paths.dense_layers(qmodel)
               if not d.is_quantized)
    errs = [r["weight_rel_err"] for r in per_layer[label]]
    measure(label, qmodel, kept + sum(r.quant_bytes for r in report),
            len(report), float(np.mean(errs)) if errs else 0.0,
            {"quantization": {"format": label, "rules": rules[label], "source": str(workdir),
                              "source_step": source_step}})
  return {"source": str(workdir), "step": source_step, "out_dir": str(out_dir),
          "machine": metrics.machine(),
          "eval": {"windows": windows, "seq_len": config.data.seq_len,
                   "batch_size": batch_size or config.train.batch_size,
                   "protocol": "Trainer.evaluate: disjoint held-out windows"},
          "keep_float": keep_float, "impl": impl, "rows": rows, "layers": per_layer}


_COLUMNS = (("format", "{:<16}", 16), ("quantized_layers", "{:>7}", 7),
            ("dense_bytes", "{:>11,}", 11), ("dense_vs_bf16", "{:>7.3f}", 7),
            ("disk_bytes", "{:>11,}", 11), ("weight_rel_err", "{:>8.2e}", 8),
            ("heldout_bpb", "{:>8.4f}", 8), ("bpb_rel_change", "{:>+8.3%}", 8))
_HEADS = ("format", "layers", "dense B", "x bf16", "disk B", "w_err", "bpb", "d_bpb")


def format_row(row: dict, header: bool = False) -> str:
  """One table line of a ``quantize_run`` row (with the header line first if asked)."""
  return metrics.table_row(row, _COLUMNS, _HEADS if header else None)


def format_table(result: dict) -> str:
  """The rows of a ``quantize_run`` result as the console table."""
  return "\n".join(format_row(r, header=i == 0) for i, r in enumerate(result["rows"]))


