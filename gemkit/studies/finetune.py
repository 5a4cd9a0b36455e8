"""Fine-tuning a trained run on a completion task: full, LoRA, DoRA, QLoRA, PiSSA.

  python -m launch.finetune --config=experiments/finetune_arithmetic.py

A fine-tuning config (``experiments/finetune_*.py``) names the base run
(``base.workdir``, a ``launch.train`` run directory), a task the base was not
trained on and the methods to run. Every method trains with
``gemkit.train.Trainer`` (the pre-training loop and jitted step) from the
base checkpoint, on the same data for the same steps. The launcher opens the
base (``Base(runs.load_source(*base_path(cfg)))``) and hands it to :func:`run`:

=========  ==================================================================
``full``   every base parameter trains (``nnx.Param``)
``lora``   adapters by the ``lora`` rule on the float base; only they train
``dora``   the same rule with DoRA (magnitude and direction)
``qlora``  the base quantized to ``qlora.base_format`` (nf4), the same adapters
``pissa``  the same rule with PiSSA init (the base becomes its residual)
=========  ==================================================================

Tasks (``task.kind``):

* ``arithmetic``: ``"$a+b="`` -> ``"c$"``, operands of 1..``task.digits``
  digits, the sum reversed with ``task.reverse`` (Lee et al. 2023, "Teaching
  Arithmetic to Small Transformers"), drawn by ``gemkit.synthetic``: no
  download. Held-out examples are distinct problems, none in the training set.
* ``jsonl``: ``{"prompt": str, "completion": str}`` lines (``task.path``);
  held out: ``task.eval_path`` or, without one, the prompts whose hash falls
  under ``task.heldout_fraction``.

Examples are ``BOS prompt completion EOS`` in the base's tokenizer's ids
(``Base.tokenizer``: BOS only where it has one), packed whole with one
segment each; the loss is on the completion (and its EOS) only
(``gemkit.data.PackedCompletions``).

Reported per method (:func:`run`): exact match (greedy generation through
the KV cache reproduces the completion and stops), held-out completion loss
(nats per completion token), trainable parameters (count and % of all),
bytes of the trainable and frozen arrays and of the optimizer state (summed
over the arrays), XLA's peak memory of the compiled train step, the device's
peak bytes in use where the backend reports them (CPU does not) and the
median step time. ``<workdir>/<method>/`` is each method's Trainer run
directory (``gemkit.runs.load`` rebuilds its model) and, for adapter
methods, ``<workdir>/<method>/adapter/`` the adapter alone
(``gemkit.surgery.lora.load_adapter``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import shutil
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from gemkit import data as data_lib
from gemkit import hf
from gemkit import metrics
from gemkit import runs
from gemkit import sample as sample_lib
from gemkit import synthetic
from gemkit import train as train_lib
from gemkit.config import ConfigError
from gemkit.surgery import finetuned, lora, quantize
from gemkit.tokenizer import PAD, Tokenizer, resolve

METHODS = ("full", "lora", "dora", "qlora", "pissa")
TASKS = ("arithmetic", "jsonl")


# --- task data ------------------------------------------------------------------------------


def arithmetic_examples(task: synthetic.Arithmetic, seed: int, n: int, start: int = 0,
                        tokenizer: Tokenizer | None = None) -> list[data_lib.Completion]:
  """Examples ``start .. start + n - 1`` of ``task`` as (prompt, completion + EOS), in
  ``tokenizer``'s ids (default bytes)."""
  tok, out = resolve(tokenizer), []
  for ex in synthetic.examples(task, seed, n, start, tok):
    out.append(data_lib.Completion(ex.prompt.astype(np.int32),
                                   np.append(ex.answer, tok.eos_id).astype(np.int32)))
  return out


def jsonl_examples(path: str, key: str = "task.path",
                   tokenizer: Tokenizer | None = None) -> list[data_lib.Completion]:
  """``{"prompt": str, "completion": str}`` lines in ``tokenizer``'s ids (default bytes);
  errors name the file and line."""
  out = []
  for where, record in data_lib.jsonl_records(path, key):
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
            and isinstance(record.get("completion"), str) and record["completion"]):
      raise ConfigError(key, f"{where}: needs string fields 'prompt' and 'completion' "
                        "(non-empty)")
    out.append(data_lib.Completion.from_text(record["prompt"], record["completion"],
                                             tokenizer))
  if not out:
    raise ConfigError(key, f"{path} holds no examples")
  return out


class TaskData:
  """A task's packed train and held-out rows: the ``data`` of ``gemkit.train.Trainer``
  (``pad_id``: the tokenizer's PAD, which fills the rows)."""

  def __init__(self, train: Sequence[data_lib.Completion], heldout: Sequence[data_lib.Completion],
               seq_len: int, identity: dict, prefetch: int = 2, pad_id: int = PAD):
    if not train or not heldout:
      raise ConfigError("task", f"needs training and held-out examples, got {len(train)} "
                        f"and {len(heldout)}")
    self.train, self.heldout = list(train), list(heldout)
    self.train_rows = data_lib.PackedCompletions(self.train, seq_len, pad_id)
    self.heldout_rows = data_lib.PackedCompletions(self.heldout, seq_len, pad_id)
    self.seq_len, self.identity, self.prefetch = seq_len, identity, prefetch
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for ex in self.train + [None] + self.heldout:
      digest.update(b"|" if ex is None else ex.prompt.tobytes() + b":" + ex.completion.tobytes())
    self.fingerprint = digest.hexdigest()[:16]

  def train_dataset(self, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1):
    return data_lib.shuffled_batches(self.train_rows, batch_size, seed, process_index,
                                     process_count, self.prefetch)

  def eval_batches(self, batch_size: int, max_rows: int | None = None):
    return self.heldout_rows.batches(batch_size, max_rows)

  def summary(self) -> dict:
    tokens = lambda exs: sum(ex.completion.size for ex in exs)
    return {**self.identity, "fingerprint": self.fingerprint,
            "train_examples": len(self.train), "train_rows": len(self.train_rows),
            "heldout_examples": len(self.heldout), "heldout_rows": len(self.heldout_rows),
            "heldout_completion_tokens": tokens(self.heldout)}


def task_data(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> TaskData:
  """The TaskData of a fine-tuning config's ``task`` block in ``tokenizer``'s ids
  (default bytes)."""
  t, tok = cfg.task, resolve(tokenizer)
  if t.kind == "arithmetic":
    spec = synthetic.Arithmetic(digits=t.digits, reverse=t.reverse, min_digits=t.min_digits)
    train = arithmetic_examples(spec, cfg.seed, t.train_examples, tokenizer=tok)
    seen, heldout = {ex.prompt.tobytes() for ex in train}, []
    for ex in arithmetic_examples(spec, cfg.seed + 1, 8 * t.eval_examples, tokenizer=tok):
      if len(heldout) < t.eval_examples and ex.prompt.tobytes() not in seen:
        seen.add(ex.prompt.tobytes())          # distinct problems, none seen in training
        heldout.append(ex)
    identity = {"kind": "arithmetic", "digits": t.digits, "min_digits": t.min_digits,
                "reverse": t.reverse, "seed": cfg.seed}
  elif t.kind == "jsonl":
    examples = jsonl_examples(t.path, tokenizer=tok)
    if t.eval_path:
      train, heldout = examples, jsonl_examples(t.eval_path, "task.eval_path", tok)
    else:
      held = [data_lib.in_heldout(ex.prompt.tobytes(), t.heldout_fraction) for ex in examples]
      train = [ex for ex, h in zip(examples, held) if not h]
      heldout = [ex for ex, h in zip(examples, held) if h]
    train = train[:t.train_examples] if t.train_examples else train
    heldout = heldout[:t.eval_examples] if t.eval_examples else heldout
    identity = {"kind": "jsonl", "path": t.path, "eval_path": t.eval_path,
                "heldout_fraction": t.heldout_fraction}
  else:
    raise ConfigError("task.kind", f"must be one of {TASKS}, got {t.kind!r}")
  return TaskData(train, heldout, t.seq_len, identity, prefetch=t.prefetch, pad_id=tok.pad_id)


# --- metrics --------------------------------------------------------------------------------


def exact_match(model: nnx.Module, examples: Sequence[data_lib.Completion], *,
                batch_size: int = 512, tokenizer: Tokenizer | None = None) -> dict:
  """Greedy generation (KV cache) from each prompt; correct iff it reproduces the completion.

  The completion ends with EOS, so a correct generation also stops there.
  Returns {"exact_match", "n", "samples": a few (prompt, generated, expected)}, the
  samples decoded with ``tokenizer`` (default bytes), whose stop ids end generation.
  """
  tok = resolve(tokenizer)
  steps = max(ex.completion.size for ex in examples)
  correct, samples = [], []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    out = sample_lib.generate_ids(model, [ex.prompt for ex in chunk], max_new_tokens=steps,
                                  eos_ids=tok.stop_ids, pad_id=tok.pad_id)
    for ex, row in zip(chunk, out):
      correct.append(bool(np.array_equal(row[:ex.completion.size], ex.completion)))
      if len(samples) < 4:
        samples.append({"prompt": tok.decode(ex.prompt), "generated": tok.decode(
            row[:ex.completion.size]), "expected": tok.decode(ex.completion)})
  return {"exact_match": float(np.mean(correct)), "n": len(correct), "samples": samples}


def completion_loss(model: nnx.Module, task: TaskData, batch_size: int) -> float:
  """Held-out loss, nats per completion token (EOS included), as ``Trainer.evaluate``."""
  graphdef, params, frozen = train_lib.split_model(model)
  return train_lib.heldout_loss(graphdef, params, frozen, task.eval_batches(batch_size))["loss"]


def tree_bytes(tree: Any) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def device_peak_bytes() -> int | None:
  """The device's peak bytes in use so far, if the backend reports it (GPU/TPU; CPU: None)."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


# --- the base and the methods ------------------------------------------------------------


class Base:
  """The float base every method starts from: a ``runs.Source`` (a ``launch.train`` run
  or a Hugging Face directory), its fingerprint and parameter count."""

  def __init__(self, source: runs.Source):
    if not finetuned.is_float_base(source.model):
      raise ConfigError("base.workdir", f"{source.path} is not a float base (quantized or "
                        "adapted)")
    self.workdir, self.step = source.path, source.step
    self.model, self.config, self.tokenizer = source.model, source.config, source.tokenizer
    self.fingerprint = lora.fingerprint(self.model)
    self.num_params = train_lib.count_params(nnx.state(self.model, nnx.Param))

  def info(self) -> dict:
    return {"workdir": self.workdir, "step": self.step, "fingerprint": self.fingerprint}


def base_path(cfg: ml_collections.ConfigDict) -> tuple[str, int | None]:
  """(directory, step or None for the latest) of the base a fine-tuning config names:
  ``model.init_from`` (a Hugging Face directory) or ``base.workdir`` at ``base.step``."""
  init_from = cfg.get("model", {}).get("init_from")
  return (init_from, None) if init_from else (cfg.base.workdir, cfg.base.step or None)


def lora_rule(cfg: ml_collections.ConfigDict, method: str) -> lora.LoRARule:
  """The adapter rule of ``method`` from the config's ``lora`` block."""
  c = cfg.lora
  try:
    return lora.LoRARule(targets=c.targets, rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                         rslora=c.rslora, dora=method == "dora",
                         init="pissa" if method == "pissa" else "standard")
  except ValueError as e:
    raise ConfigError("lora", str(e)) from None


def method_settings(cfg: ml_collections.ConfigDict, method: str) -> dict:
  """What defines ``method``'s model (recorded in its checkpoints; :func:`build_model`)."""
  if method == "full":
    return {"method": method}
  rules = (quantize.rules_to_json(quantize.default_rules(cfg.qlora.base_format))
           if method == "qlora" else None)
  return {"method": method, "adapter": method, "rule": lora_rule(cfg, method).to_dict(),
          "quantization": {"rules": rules} if rules else None, "seed": cfg.seed}


def trainer_config(cfg: ml_collections.ConfigDict, method: str,
                   base: Base) -> ml_collections.ConfigDict:
  """The experiment config the Trainer runs: the base's model, the fine-tuning train block.

  ``data`` supplies only seq_len and prefetch (the task is ``TaskData``).
  """
  c = ml_collections.ConfigDict()
  c.name = f"{cfg.name}_{method}"
  c.seed = cfg.seed
  c.model = copy.deepcopy(base.config.model)
  c.data = ml_collections.ConfigDict({
      "source": "stdlib", "path": "", "jsonl_field": "text", "seq_len": cfg.task.seq_len,
      "heldout_fraction": 0.05, "eval_windows": 1 << 30, "prefetch": cfg.task.prefetch})
  c.train = copy.deepcopy(cfg.train)
  c.train.lr = float(cfg.lr[method])
  c.mesh = copy.deepcopy(cfg.mesh)
  return c


def _step_seconds(workdir: pathlib.Path, tokens_per_step: int) -> float | None:
  """Median step time over the logged windows after the first (which holds compilation)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  rates = [r["tokens_per_sec"] for r in map(json.loads, path.read_text().splitlines())
           if r["split"] == "train"]
  rates = rates[1:] or rates
  return tokens_per_step / statistics.median(rates) if rates else None


def run_method(cfg: ml_collections.ConfigDict, method: str, base: Base, task: TaskData,
               workdir: pathlib.Path, log: Callable[[str], None] = print,
               export_peft: str | pathlib.Path | None = None) -> dict:
  """Fine-tunes one method in ``workdir`` (resuming if it holds a checkpoint); its table row.

  ``export_peft``: also write an adapter method's adapter there as a PEFT LoRA
  directory (``gemkit.hf.save_adapter``; checked before training)."""
  settings = method_settings(cfg, method)
  model, trainable = finetuned.build(base.model, base.fingerprint, settings)
  hf_base = base.workdir if hf.is_model_dir(base.workdir) else None
  if export_peft is not None and method != "full":
    hf.peft.check_exportable(model, name=settings["adapter"], base_name_or_path=hf_base)
  tcfg = trainer_config(cfg, method, base)
  meta = {"finetune": {**settings, "base": base.info(), "task": task.identity,
                       "task_fingerprint": task.fingerprint}}
  trainer = train_lib.Trainer(tcfg, workdir, model_fn=lambda: model, trainable=trainable,
                              data=task, meta=meta, tokenizer=base.tokenizer)
  try:
    trainable_n, total_n = (lora.count(model, settings.get("adapter"))
                            if method != "full" else (base.num_params, base.num_params))
    memory = trainer.step_memory()
    start = time.perf_counter()
    trainer.run()
    train_s = time.perf_counter() - start
    tuned = trainer.model()
    t0 = time.perf_counter()
    em = exact_match(tuned, task.heldout, tokenizer=base.tokenizer)
    loss = completion_loss(tuned, task, cfg.train.batch_size)
    eval_s = time.perf_counter() - t0
    row = {
        "method": method, "exact_match": em["exact_match"], "heldout_loss": loss,
        "trainable_params": trainable_n, "total_params": total_n,
        "trainable_pct": 100.0 * trainable_n / total_n,
        "trainable_bytes": tree_bytes(trainer.state.params),
        "frozen_bytes": tree_bytes(trainer.state.frozen),
        "opt_state_bytes": tree_bytes(trainer.state.opt_state),
        "xla_step_peak_bytes": memory.get("peak_memory_in_bytes"),
        "device_peak_bytes": device_peak_bytes(),
        "step_s": _step_seconds(pathlib.Path(workdir),
                                cfg.train.batch_size * cfg.task.seq_len),
        "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "steps": trainer.step,
        "lr": tcfg.train.lr, "samples": em["samples"], "workdir": str(workdir)}
    if method != "full":
      row["rule"] = settings["rule"]
      row["adapter_dir"] = str(lora.save_adapter(
          tuned, pathlib.Path(workdir) / "adapter", name=settings["adapter"], step=trainer.step,
          base_info={**base.info(), "quantization": settings["quantization"]}).parent)
      if export_peft is not None:
        row["peft_dir"] = str(hf.save_adapter(tuned, export_peft, name=settings["adapter"],
                                              base_name_or_path=hf_base))
  finally:
    trainer.close()
  log(format_row(row))
  return row


def run_seeds(cfg: ml_collections.ConfigDict, base: Base,
              workdir: str | pathlib.Path | None = None, *, overwrite: bool = False, log: Callable[[str], None] = print,
              export_peft: str | pathlib.Path | None = None) -> dict:
  """:func:`run` for seeds ``cfg.seed .. cfg.seed + cfg.seeds - 1`` (each in
  ``<workdir>/seed<s>``: its own adapter init, data order and arithmetic draw,
  and ``<export_peft>/seed<s>`` for the PEFT adapters), summarised by
  :func:`summarize`; with ``cfg.seeds == 1`` just :func:`run`.

  Small models learn the arithmetic task in plateaus, and when one run leaves
  a plateau is a matter of seed: one seed can put any method tens of points
  above or below another, so the comparison is over seeds."""
  workdir = pathlib.Path(workdir or pathlib.Path("runs") / cfg.name)
  if cfg.seeds == 1:
    return run(cfg, base, workdir, overwrite=overwrite, log=log, export_peft=export_peft)
  reports = []
  for seed in range(cfg.seed, cfg.seed + cfg.seeds):
    c = cfg.copy_and_resolve_references()
    c.seed, c.seeds = seed, 1
    log(f"# seed {seed}")
    peft_dir = None if export_peft is None else pathlib.Path(export_peft) / f"seed{seed}"
    reports.append(run(c, base, workdir / f"seed{seed}", overwrite=overwrite, log=log,
                       export_peft=peft_dir))
  return summarize(reports)


_PER_SEED = ("exact_match", "heldout_loss", "step_s", "train_s")


def summarize(reports: Sequence[dict]) -> dict:
  """One report from per-seed reports of the same methods: each row's
  ``exact_match``, ``heldout_loss``, ``step_s`` and ``train_s`` become the
  mean over seeds (``<key>_seeds`` keeps every value, ``<key>_std`` the sample
  standard deviation), the rest (parameter counts, bytes) is the first
  seed's; the shares of full fine-tuning's gain are then computed on the
  means."""
  if not reports:
    raise ValueError("summarize: no reports")
  methods = [r["method"] for r in reports[0]["rows"]]
  for rep in reports[1:]:
    if [r["method"] for r in rep["rows"]] != methods:
      raise ValueError(f"summarize: reports of different methods: {methods} vs "
                       f"{[r['method'] for r in rep['rows']]}")
  rows = []
  for i, method in enumerate(methods):
    per = [rep["rows"][i] for rep in reports]
    row = {k: v for k, v in per[0].items()
           if k not in ("samples", "workdir", "adapter_dir", "peft_dir")}
    for key in _PER_SEED:
      vals = [r.get(key) for r in per]
      if any(v is None for v in vals):
        continue
      row[key], row[f"{key}_seeds"] = statistics.fmean(vals), vals
      row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    rows.append(row)
  _relative_to_full(rows[0], rows[1:])
  return {**{k: v for k, v in reports[0].items() if k not in ("rows", "task")},
          "seeds": [rep["config"]["seed"] for rep in reports],
          "task": [rep["task"] for rep in reports], "rows": rows,
          "elapsed_s": round(sum(rep["elapsed_s"] for rep in reports), 1), "runs": reports}


def run(cfg: ml_collections.ConfigDict, base: Base, workdir: str | pathlib.Path | None = None,
        *, methods: Sequence[str] | None = None, overwrite: bool = False,
        log: Callable[[str], None] = print,
        export_peft: str | pathlib.Path | None = None) -> dict:
  """Fine-tunes ``base`` with each method on the task; returns the report (table rows).

  ``export_peft``: each adapter method's adapter is also written as a PEFT LoRA
  directory ``<export_peft>/<method>`` (``gemkit.hf.save_adapter``)."""
  validate_config(cfg)
  methods = list(methods or [m.strip() for m in cfg.methods.split(",") if m.strip()])
  for m in methods:
    if m not in METHODS:
      raise ConfigError("methods", f"unknown method {m!r}; methods are {METHODS}")
  workdir = pathlib.Path(workdir or pathlib.Path("runs") / cfg.name)
  start = time.perf_counter()
  task = task_data(cfg, base.tokenizer)
  log(f"base {base.workdir} step {base.step} ({base.num_params:,} parameters, fingerprint "
      f"{base.fingerprint}); task {task.summary()}")
  t0 = time.perf_counter()
  em = exact_match(base.model, task.heldout, tokenizer=base.tokenizer)
  base_row = {"method": "base", "exact_match": em["exact_match"],
              "heldout_loss": completion_loss(base.model, task, cfg.train.batch_size),
              "trainable_params": 0, "total_params": base.num_params, "trainable_pct": 0.0,
              "samples": em["samples"], "eval_s": round(time.perf_counter() - t0, 1)}
  log(format_row(base_row, header=True))
  rows = []
  for method in methods:
    target = workdir / method
    if overwrite and target.exists():
      shutil.rmtree(target)
    rows.append(run_method(cfg, method, base, task, target, log,
                           None if export_peft is None else pathlib.Path(export_peft) / method))
  _relative_to_full(base_row, rows)
  return {"config": cfg.to_dict(), "base": base.info() | {"params": base.num_params},
          "task": task.summary(), "machine": metrics.machine(), "workdir": str(workdir),
          "rows": [base_row] + rows,
          "elapsed_s": round(time.perf_counter() - start, 1)}


def _relative_to_full(base_row: dict, rows: list[dict]) -> None:
  """Each row's share of full fine-tuning's improvement, in exact match and in loss."""
  full = next((r for r in rows if r["method"] == "full"), None)
  for r in rows:
    r["em_gain_vs_full"] = r["loss_gain_vs_full"] = None
    if full is None:
      continue
    gain = full["exact_match"] - base_row["exact_match"]
    if gain > 0:
      r["em_gain_vs_full"] = (r["exact_match"] - base_row["exact_match"]) / gain
    drop = base_row["heldout_loss"] - full["heldout_loss"]
    if drop > 0:
      r["loss_gain_vs_full"] = (base_row["heldout_loss"] - r["heldout_loss"]) / drop


# --- config validation, table ---------------------------------------------------------------


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first fine-tuning config key that cannot work."""
  def need(cond, key, msg):
    if not cond:
      raise ConfigError(key, msg)

  need(cfg.seeds >= 1, "seeds", f"must be >= 1, got {cfg.seeds}")
  t = cfg.task
  need(t.kind in TASKS, "task.kind", f"must be one of {TASKS}, got {t.kind!r}")
  need(t.seq_len >= 8, "task.seq_len", f"must be >= 8, got {t.seq_len}")
  if t.kind == "arithmetic":
    need(1 <= t.min_digits <= t.digits, "task.digits",
         f"need 1 <= task.min_digits <= task.digits, got {t.min_digits}, {t.digits}")
    need(t.train_examples >= 1, "task.train_examples", f"must be >= 1, got {t.train_examples}")
    need(t.eval_examples >= 1, "task.eval_examples", f"must be >= 1, got {t.eval_examples}")
  else:
    need(bool(t.path), "task.path", "task.kind='jsonl' needs a file of prompt/completion lines")
    need(pathlib.Path(t.path).is_file(), "task.path", f"no such file: {t.path!r}")
    need(not t.eval_path or pathlib.Path(t.eval_path).is_file(), "task.eval_path",
         f"no such file: {t.eval_path!r}")
    need(0.0 < t.heldout_fraction < 1.0, "task.heldout_fraction",
         f"must be in (0, 1), got {t.heldout_fraction}")
  methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
  need(bool(methods) and all(m in METHODS for m in methods), "methods",
       f"must be a comma-separated subset of {METHODS}, got {cfg.methods!r}")
  for m in methods:
    need(m in cfg.lr and cfg.lr[m] > 0, f"lr.{m}", f"must be > 0, got {cfg.lr.get(m)}")
    if m != "full":
      lora_rule(cfg, m)
  if "qlora" in methods:
    try:
      quantize.QuantSpec.parse(cfg.qlora.base_format)
    except ValueError as e:
      raise ConfigError("qlora.base_format", str(e)) from None
  init_from = cfg.get("model", {}).get("init_from")
  if init_from:
    need(pathlib.Path(init_from, "config.json").is_file(), "model.init_from",
         f"{init_from!r} is not a Hugging Face model directory (no config.json)")
  else:
    need(pathlib.Path(cfg.base.workdir, "checkpoints").is_dir(), "base.workdir",
         f"no checkpoints under {cfg.base.workdir!r}: train a base with launch.train first")
  need(cfg.base.step >= 0, "base.step", f"must be >= 0 (0: latest), got {cfg.base.step}")


_COLUMNS = (("method", "{:<6}", 6), ("exact_match", "{:>7.1%}", 7),
            ("heldout_loss", "{:>7.4f}", 7), ("em_gain_vs_full", "{:>7.1%}", 7),
            ("trainable_params", "{:>10,}", 10), ("trainable_pct", "{:>7.2f}", 7),
            ("opt_state_bytes", "{:>11,}", 11), ("frozen_bytes", "{:>11,}", 11),
            ("xla_step_peak_bytes", "{:>12,}", 12), ("step_s", "{:>6.3f}", 6),
            ("train_s", "{:>7.1f}", 7))
_HEADS = ("method", "EM", "loss", "vs full", "trainable", "% all", "opt B", "frozen B",
          "XLA peak B", "step s", "train s")


def format_row(row: dict, header: bool = False) -> str:
  """One line of the console table (the header line first if asked)."""
  return metrics.table_row(row, _COLUMNS, _HEADS if header else None)


def markdown_table(report: dict) -> str:
  """The report's rows as a Markdown table."""
  head = ("| method | exact match | held-out loss | share of full FT gain (EM / loss) | "
          "trainable params (% of all) | optimizer state | frozen arrays | XLA step peak | "
          "step time |")
  lines = [head, "|" + "---|" * 9]
  mb = lambda b: "" if b is None else f"{b / 2**20:.2f} MiB"
  pct = lambda v: "" if v is None else f"{v:.0%}"
  sec = lambda v: "" if v is None else f"{v:.3f} s"
  def spread(r, key, fmt):   # "mean ± sd (seed 0 / seed 1 / ...)" over seeds, else the value
    if f"{key}_seeds" not in r:
      return fmt.format(r[key])
    vals = " / ".join(fmt.format(v) for v in r[f"{key}_seeds"])
    return f"{fmt.format(r[key])} ± {fmt.format(r[f'{key}_std'])} ({vals})"
  for r in report["rows"]:
    lines.append(
        f"| {r['method']} | {spread(r, 'exact_match', '{:.1%}')} | "
        f"{spread(r, 'heldout_loss', '{:.4f}')} | "
        f"{pct(r.get('em_gain_vs_full'))} / {pct(r.get('loss_gain_vs_full'))} | "
        f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%) | {mb(r.get('opt_state_bytes'))} | "
        f"{mb(r.get('frozen_bytes'))} | {mb(r.get('xla_step_peak_bytes'))} | "
        f"{sec(r.get('step_s'))} |")
  return "\n".join(lines)


