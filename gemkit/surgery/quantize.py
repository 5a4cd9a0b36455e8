"""Post-training quantization of a model's Dense layers by regex rules over module paths.

>>> from gemkit.surgery import quantize
>>> qmodel, report = quantize.quantize_model(model, quantize.default_rules("int4-g128"))
>>> print(quantize.format_layers(report))

``rules`` is an ordered list of ``(regex, spec)`` pairs (or a dict) over
module paths (``gemkit.surgery.paths``): each :class:`models.layers.Dense`
takes the spec of the first rule whose regex matches its whole path
(``re.fullmatch``);
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
format is in ``ops.quant.reference``. ``gemkit.studies.quantize``
(``launch.quantize``) turns a model into quantized run directories and
measures held-out bits-per-byte; ``gemkit.runs.load`` rebuilds a quantized
model from the rules recorded in its checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemkit.surgery import paths
from ops import quant

_ALIASES = (("w8a8-int8", "int8-a8"), ("w8a8-fp8", "fp8-afp8"), ("w8a8", "int8-a8"))
LLM_INT8_THRESHOLD = 6.0  # Dettmers et al. (2022)


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
    kw: dict[str, Any] = {"group_size": quant.DEFAULT_GROUP_SIZE.get(fmt)}
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
  dense = paths.dense_layers(model)
  chosen = paths.select([p for p, _ in dense], [r.fullmatch for r, _ in parsed],
                        names=[r.pattern for r, _ in parsed], what="quantization",
                        required=[s is not None for _, s in parsed])
  infos, errs = [], []
  for (path, layer), i in zip(dense, chosen):
    spec = None if i is None else parsed[i][1]
    if spec is None:
      continue
    if layer.is_quantized:
      raise ValueError(f"{path}: already quantized ({layer.quant_layout[0]}), rule "
                       f"{parsed[i][0].pattern!r} -> {spec.name!r}")
    w = layer.kernel[...]
    try:
      layer.quantize(**spec.dense_kwargs(), impl=impl)
    except ValueError as e:
      raise ValueError(f"{path} [{w.shape[0]}, {w.shape[1]}] -> {spec.name!r}: {e}") from None
    qw = layer.quantized_weight()
    w32 = w.astype(jnp.float32)
    errs.append(jnp.linalg.norm(quant.dequantize(qw) - w32)
                / jnp.maximum(jnp.linalg.norm(w32), 1e-30))
    infos.append((path, spec.name, tuple(w.shape), w.size * jnp.dtype(w.dtype).itemsize,
                  qw.nbytes))
  return infos, errs


def format_layers(report: Sequence[LayerReport]) -> str:
  """A per-layer table of ``quantize_model``'s report."""
  lines = [f"{'layer':<28} {'shape':>11}  {'spec':<16} {'bytes':>10} {'x bf16':>7} {'w_err':>8}"]
  for r in report:
    lines.append(f"{r.path:<28} {r.shape[0]:>5}x{r.shape[1]:<5}  {r.spec:<16} "
                 f"{r.quant_bytes:>10,} {r.vs_bf16:>7.3f} {float(r.weight_rel_err):>8.2e}")
  return "\n".join(lines)
