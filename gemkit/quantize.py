"""Post-training quantization of a model's Dense layers by regex rules over module paths.

>>> from gemkit import quantize
>>> qmodel, report = quantize.quantize_model(model, quantize.default_rules("int4-g128"))
>>> print(quantize.format_layers(report))

A module path is the attribute path from the model root joined by ``/``
(``blocks/0/mlp/gate_proj``). ``rules`` is an ordered list of
``(regex, spec)`` pairs (or a dict): each :class:`models.layers.Dense` takes the
spec of the first rule whose regex matches its whole path (``re.fullmatch``);
a spec of ``None`` keeps the layer in float, a layer no rule matches stays in
float too. Only Dense layers are quantized: embeddings (``Embed``, also the
tied LM head) and norms always stay float. A rule with a spec that selects no
layer is an error (a typo would otherwise quantize nothing).

Format specs are strings, ``base[-option...]``:

=================  ================================================================
base               ``int8`` (per channel), ``int4`` (g128), ``nf4``, ``fp4`` (g64),
                   ``fp8`` (per channel), ``ternary`` (per tensor); aliases
                   ``w8a8`` = ``int8-a8``, ``w8a8-fp8`` = ``fp8-afp8``
``g<N>``           group size along the input axis (must divide it)
``asym``           int4 with zero points
``dq``             nf4 / fp4 double quantization of the scales (QLoRA)
``a8`` / ``afp8``  dynamic per-token int8 (W8A8) / fp8 activations
``llm.int8[=t]``   with ``a8``: LLM.int8() outlier columns ``|x| >= t`` (6.0) in float
=================  ================================================================

so ``"int4-g128-asym"``, ``"nf4-dq"``, ``"w8a8-llm.int8"``. The math of each
format is in ``ops.quant.reference``. :func:`quantize_run` (``launch.quantize``)
turns a training run into quantized run directories and measures held-out
bits-per-byte; ``gemkit.runs.load`` rebuilds a quantized model from the rules
recorded in its checkpoint metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gemkit import checkpoint as ckpt_lib
from gemkit import data as data_lib
from gemkit import metrics
from gemkit import tokenizer as tokenizer_lib
from gemkit import train as train_lib
from gemkit.config import ConfigError
from models import layers
from ops import quant
from ops.quant.reference import DEFAULT_GROUP_SIZE

_ALIASES = (("w8a8-int8", "int8-a8"), ("w8a8-fp8", "fp8-afp8"), ("w8a8", "int8-a8"))
LLM_INT8_THRESHOLD = 6.0  # Dettmers et al. (2022)
FLOAT = "float"           # the label of the unquantized baseline row


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one Dense layer is quantized: ``ops.quant.quantize`` + ``quantized_matmul`` settings."""

  fmt: str
  group_size: int | None = None
  symmetric: bool = True
  double_quant: bool = False
  act_fmt: str | None = None
  outlier_threshold: float | None = None

  @classmethod
  def parse(cls, spec: "str | QuantSpec") -> "QuantSpec":
    """A spec string (module docstring) -> QuantSpec; group sizes made explicit."""
    if isinstance(spec, QuantSpec):
      return spec
    if not isinstance(spec, str) or not spec:
      raise ValueError(f"a quantization spec must be a non-empty string, got {spec!r}")
    text = spec.strip().lower()
    for alias, full in _ALIASES:
      if text == alias or text.startswith(alias + "-"):
        text = full + text[len(alias):]
        break
    fmt, *options = text.split("-")
    if fmt not in quant.FORMATS:
      raise ValueError(f"spec {spec!r}: unknown format {fmt!r}; formats are "
                       f"{', '.join(quant.FORMATS)} (aliases w8a8, w8a8-fp8)")
    kw: dict[str, Any] = {"group_size": DEFAULT_GROUP_SIZE.get(fmt)}
    for opt in options:
      if re.fullmatch(r"g\d+", opt):
        kw["group_size"] = int(opt[1:])
      elif opt == "asym":
        kw["symmetric"] = False
      elif opt == "dq":
        kw["double_quant"] = True
      elif opt in ("a8", "afp8"):
        kw["act_fmt"] = "int8" if opt == "a8" else "fp8"
      elif re.fullmatch(r"llm\.int8(=[0-9.]+)?", opt):
        kw["outlier_threshold"] = float(opt.split("=")[1]) if "=" in opt else LLM_INT8_THRESHOLD
      else:
        raise ValueError(f"spec {spec!r}: unknown option {opt!r}; options are g<N>, asym, "
                         "dq, a8, afp8, llm.int8[=threshold]")
    if kw.get("outlier_threshold") is not None and kw.get("act_fmt") != "int8":
      raise ValueError(f"spec {spec!r}: llm.int8 needs int8 activations (a8 or w8a8)")
    return cls(fmt, **kw)

  @property
  def name(self) -> str:
    """The canonical spec string: ``QuantSpec.parse(spec.name) == spec``."""
    per_channel = self.group_size is None
    if self.fmt == "int8" and self.act_fmt == "int8" and per_channel:
      parts = ["w8a8"]
    elif self.fmt == "fp8" and self.act_fmt == "fp8" and per_channel:
      parts = ["w8a8-fp8"]
    else:
      parts = [self.fmt] + ([] if per_channel else [f"g{self.group_size}"])
      parts += {"int8": ["a8"], "fp8": ["afp8"], None: []}[self.act_fmt]
    parts += ([] if self.symmetric else ["asym"]) + (["dq"] if self.double_quant else [])
    if self.outlier_threshold is not None:
      t = self.outlier_threshold
      parts.append("llm.int8" + ("" if t == LLM_INT8_THRESHOLD else f"={t:g}"))
    return "-".join(parts)

  def dense_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of ``models.layers.Dense.quantize``."""
    return dataclasses.asdict(self)


Rules = Sequence[tuple[str, "str | QuantSpec | None"]] | Mapping[str, "str | QuantSpec | None"]


def parse_rules(rules: Rules) -> list[tuple[re.Pattern, QuantSpec | None]]:
  """(compiled regex, QuantSpec or None) pairs, in order; ValueError names a bad one."""
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  parsed = []
  for item in items:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ValueError(f"rules must be (regex, spec) pairs, got {item!r}")
    pattern, spec = item
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"rule regex {pattern!r} is invalid: {e}") from None
    parsed.append((regex, None if spec is None else QuantSpec.parse(spec)))
  return parsed


def rules_to_json(rules: Rules) -> list[list[str | None]]:
  """``rules`` with canonical spec names: what a quantized checkpoint records."""
  return [[r.pattern, None if s is None else s.name] for r, s in parse_rules(rules)]


def default_rules(spec: str | QuantSpec, keep_float: str = r"(.*/)?head") -> list:
  """Every Dense layer to ``spec`` except those matching ``keep_float`` (an untied LM head)."""
  return [(keep_float, None), (r".*", spec)]


def dense_layers(model: nnx.Module) -> list[tuple[str, layers.Dense]]:
  """(path, Dense) of every Dense layer of ``model``, paths joined by ``/``."""
  return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, layers.Dense)]


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One quantized layer: its spec, storage and the weight's relative error.

  ``float_bytes`` is the kernel as it was stored (its param dtype),
  ``quant_bytes`` the ``QuantizedWeight.nbytes`` (codes + scales + zeros);
  ``weight_rel_err`` = ||W_hat - W|| / ||W|| (Frobenius).
  """

  path: str
  spec: str
  shape: tuple[int, int]
  float_bytes: int
  quant_bytes: int
  weight_rel_err: Any  # a jax scalar (abstract under eval_shape)

  @property
  def vs_bf16(self) -> float:
    return self.quant_bytes / (2 * self.shape[0] * self.shape[1])

  def as_dict(self) -> dict:
    return {"path": self.path, "spec": self.spec, "shape": list(self.shape),
            "float_bytes": self.float_bytes, "quant_bytes": self.quant_bytes,
            "vs_bf16": self.vs_bf16, "weight_rel_err": float(self.weight_rel_err)}


def quantize_model(model: nnx.Module, rules: Rules, *,
                   impl: str = "auto") -> tuple[nnx.Module, list[LayerReport]]:
  """A copy of ``model`` with the Dense layers that ``rules`` select quantized.

  Args:
    model: any NNX model built from ``models.layers.Dense`` (left unchanged).
    rules: ``(regex, spec)`` pairs or a dict, first full match wins (module
      docstring); spec ``None`` keeps a layer float.
    impl: ``quantized_matmul`` implementation of every quantized layer (each
      layer's ``impl`` attribute can be changed afterwards).

  Returns:
    (the quantized model, one :class:`LayerReport` per quantized layer).
    All layers are quantized in one jitted function (one compilation). Works
    under ``nnx.eval_shape`` (then the reports' errors are abstract).
  """
  parsed = parse_rules(rules)
  graphdef, state = nnx.split(model)
  traced: dict[str, Any] = {}

  def run(state):
    m = nnx.merge(graphdef, state)
    traced["layers"], errs = _quantize_layers(m, parsed, impl)
    traced["graphdef"], qstate = nnx.split(m)
    return qstate, errs

  qstate, errs = jax.jit(run)(state)
  report = [LayerReport(*info, err) for info, err in zip(traced["layers"], errs)]
  return nnx.merge(traced["graphdef"], qstate), report


def _quantize_layers(model: nnx.Module, parsed, impl: str):
  """Quantizes ``model`` in place: ([(path, spec, shape, float bytes, quant bytes)], [err])."""
  used: set[int] = set()
  infos, errs = [], []
  for path, dense in dense_layers(model):
    i = next((i for i, (regex, _) in enumerate(parsed) if regex.fullmatch(path)), None)
    if i is None:
      continue
    used.add(i)
    spec = parsed[i][1]
    if spec is None:
      continue
    if dense.is_quantized:
      raise ValueError(f"{path}: already quantized ({dense.quant_layout[0]}), rule "
                       f"{parsed[i][0].pattern!r} -> {spec.name!r}")
    w = dense.kernel[...]
    try:
      dense.quantize(**spec.dense_kwargs(), impl=impl)
    except ValueError as e:
      raise ValueError(f"{path} [{w.shape[0]}, {w.shape[1]}] -> {spec.name!r}: {e}") from None
    qw = dense.quantized_weight()
    w32 = w.astype(jnp.float32)
    errs.append(jnp.linalg.norm(quant.dequantize(qw) - w32)
                / jnp.maximum(jnp.linalg.norm(w32), 1e-30))
    infos.append((path, spec.name, tuple(w.shape), w.size * jnp.dtype(w.dtype).itemsize,
                  qw.nbytes))
  idle = [parsed[i][0].pattern for i in range(len(parsed))
          if parsed[i][1] is not None and i not in used]
  if idle:
    paths = [p for p, _ in dense_layers(model)]
    raise ValueError(f"rule(s) {idle} matched no Dense layer; the Dense paths are "
                     f"{paths[:6]}{' ...' if len(paths) > 6 else ''}")
  return infos, errs


def format_layers(report: Sequence[LayerReport]) -> str:
  """A per-layer table of ``quantize_model``'s report."""
  lines = [f"{'layer':<28} {'shape':>11}  {'spec':<16} {'bytes':>10} {'x bf16':>7} {'w_err':>8}"]
  for r in report:
    lines.append(f"{r.path:<28} {r.shape[0]:>5}x{r.shape[1]:<5}  {r.spec:<16} "
                 f"{r.quant_bytes:>10,} {r.vs_bf16:>7.3f} {float(r.weight_rel_err):>8.2e}")
  return "\n".join(lines)


# --- held-out evaluation, quantized checkpoints, the launcher's run -------------


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


def quantize_run(workdir: str | pathlib.Path, formats: Sequence[str | tuple[str, Rules]], *,
                 out_dir: str | pathlib.Path | None = None, step: int | None = None,
                 keep_float: str = r"(.*/)?head", eval_windows: int | None = None,
                 batch_size: int | None = None, impl: str = "auto", save: bool = True,
                 overwrite: bool = False, run_config: ml_collections.ConfigDict | None = None,
                 log=print) -> dict:
  """Quantizes a run's checkpoint to each of ``formats`` and measures held-out bpb.

  ``workdir`` may instead be a Hugging Face model directory, with
  ``run_config`` an experiment config whose ``model.init_from`` names it:
  the imported model is quantized and evaluated on ``run_config.data``'s
  held-out split, encoded with the directory's tokenizer, which every
  quantized run directory records.

  A format is a spec string, which every Dense layer not matching
  ``keep_float`` takes, or a ``(label, rules)`` pair (mixed precision). With
  ``save``, ``<out_dir>/<label>/`` (default ``out_dir``: ``<workdir>_quant``)
  becomes a run directory of the quantized model, and ``<out_dir>/float/`` of
  the float parameters alone (the like-for-like size baseline). Returns a
  report: one row per format (bytes of the Dense weights as stored and vs
  bf16, checkpoint bytes on disk, held-out loss and bpb, relative change of
  bpb vs float) plus the per-layer reports. ConfigError names a bad format.
  """
  workdir = pathlib.Path(workdir)
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
  model, config, source_step, meta, tokenizer = _source(workdir, step, run_config)
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
  kernels = [d.kernel[...] for _, d in dense_layers(model)]
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
    kept = sum(d.kernel[...].nbytes for _, d in dense_layers(qmodel) if not d.is_quantized)
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


def _source(workdir: pathlib.Path, step: int | None, run_config):
  """(model, config, step, checkpoint metadata, tokenizer) of what ``quantize_run`` reads:
  a run's checkpoint, or the Hugging Face directory of ``run_config.model.init_from``."""
  from gemkit import hf, runs  # pylint: disable=g-import-not-at-top
  if run_config is not None and run_config.model.get("init_from"):
    path = run_config.model.init_from
    config = copy.deepcopy(run_config)
    with config.unlocked():
      config.model = hf.resolve_model_config(run_config.model)
    meta = {"model": config.model.to_dict(), "config": config.to_json_best_effort()}
    return (hf.load_weights(config.model, path), config, 0, meta,
            tokenizer_lib.HFTokenizer.from_dir(path))
  model, config = runs.load(workdir, step)
  if config is None:
    raise ConfigError("workdir", f"{workdir}: the checkpoint records no config to evaluate with")
  with ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False) as checkpointer:
    step = checkpointer.latest_step() if step is None else step
    meta = checkpointer.meta(step)
  return model, config, step, meta, runs.load_tokenizer(workdir)


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


