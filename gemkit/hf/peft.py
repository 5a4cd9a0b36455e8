"""PEFT LoRA adapters in and out: gemkit's LoRA / DoRA / PiSSA / QLoRA adapters as
the ``adapter_config.json`` + ``adapter_model.safetensors`` directories that
``peft.PeftModel.from_pretrained(hf_model, dir)`` reads, and such directories
onto an imported base.

    gemkit.hf.save_adapter(model, "out/lora")            # the active (or named) adapter
    model = gemkit.hf.load_adapter(base, "peft_adapter")  # wraps the layers it adapts

Module names come from the architecture's tensor map
(``architectures.Architecture.tensors``): a gemkit Dense at
``blocks/0/attn/q_proj`` is the ``nn.Linear`` whose weight is stored as
``model.layers.0.self_attn.q_proj.weight``, so its PEFT module is
``model.layers.0.self_attn.q_proj`` and its tensors are, as PEFT writes them,

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          [out, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  [out]  (DoRA)

PEFT's update of ``W [out, in]`` is ``s B A``; gemkit's of ``W [in, out]`` is
``s a b``: ``A = a^T``, ``B = b^T``, with the same ``s`` (alpha / r, or
alpha / sqrt(r) with ``use_rslora``).

* DoRA: PEFT's ``use_dora=True`` is gemkit's DoRA: ``g = m / ||W + s B A||``
  with the norm of each output unit's weights (PEFT: ``norm(dim=1)`` of
  ``[out, in]``; gemkit: over ``in`` of ``[in, out]``), ``m`` the stored
  magnitude (``lora_magnitude_vector``), the output
  ``y0 + (g - 1)(x W) + g s (x A) B`` with the bias kept out of the scaled
  part in both. Exported and imported as is.
* PiSSA: gemkit's base is the residual ``W_res = W - s A0 B0`` (A0, B0 kept
  frozen). An adapter over a residual is not an adapter of the base people
  have, so it is exported as PEFT's own conversion
  (``save_pretrained(path_initial_model_for_weight_conversion=...)``) does:
  ``W_res + s A B = W + s [A | A0] [B ; -B0]``, a plain LoRA adapter of rank
  2r (lora_alpha 2 alpha, or sqrt(2) alpha with rsLoRA: the same scaling)
  over the original base, exact up to float rounding. Imported: an adapter
  whose ``init_lora_weights`` is ``"pissa"`` (unconverted: PEFT re-runs the
  exact SVD of the base on load and subtracts the principal part) is
  rebuilt the same way by gemkit's PiSSA (``LoRARule(init="pissa")``, exact
  SVD) before the trained A, B are set; ``pissa_niter_*`` (randomized SVD),
  ``olora``, ``corda``, ``loftq``, ``eva`` and ``lora_ga`` are refused by
  name (their base change cannot be recomputed here).
* QLoRA: adapters trained over a quantized base (nf4, int4, ...) are plain
  LoRA tensors over that base's layers. They are exported as such: a valid
  PEFT adapter of the float base (PEFT applies it over the float or a
  bitsandbytes base), which is not bit-for-bit the quantized base they were
  trained on; logits differ from gemkit's QLoRA model by the quantization
  error of the base.

Refused with one line (``HFError``, a ValueError): a model no architecture
maps, an adapted layer that is not a ``Linear`` of the architecture (e.g.
Griffin's block-diagonal gates), per-layer settings PEFT's config cannot
express (rsLoRA, DoRA or dropout differing between layers; rank and alpha
may differ: ``rank_pattern`` / ``alpha_pattern``); on import, pickled
adapters (``adapter_model.bin``), non-LoRA PEFT types, an adapter whose
modules, shapes or ranks do not match the base (naming the module), and
features gemkit's adapters lack (``lora_bias``, ``bias`` other than
``"none"``, ``modules_to_save``, embedding adapters, ``fan_in_fan_out``,
``target_parameters``, trainable tokens, layer replication, aLoRA, ...).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: bf16 adapters read as such)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gemkit.hf import architectures
from gemkit.hf.checkpoint import HFError, is_model_dir, read_config, read_json
from gemkit.surgery import lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B",
            ".lora_magnitude_vector": "m", ".lora_magnitude_vector.weight": "m"}
# init_lora_weights values whose weights alone are the adapter (PEFT overwrites the init).
PLAIN_INITS = (True, False, "gaussian", "true", "false")
# adapter_config.json keys for features gemkit's adapters do not have: refused when set.
UNSUPPORTED = ("fan_in_fan_out", "lora_bias", "modules_to_save", "target_parameters",
               "trainable_token_indices", "layer_replication", "use_qalora",
               "alora_invocation_tokens", "use_bdlora", "arrow_config", "monteclora_config",
               "velora_config", "kasa_config")


# --- the architecture's Linear modules ---------------------------------------------------


def _architecture(model: nnx.Module, hf_dir: str | pathlib.Path | None = None):
  """(architecture, model config dataclass) that names ``model``'s layers."""
  cfg = getattr(model, "cfg", None)
  if cfg is None:
    raise HFError("model", f"{type(model).__name__} has no config (cfg): it is not a gemkit "
                  "model a Hugging Face architecture can map")
  if hf_dir and is_model_dir(hf_dir):
    try:
      return architectures.of_config_json(read_config(hf_dir), str(hf_dir)), cfg
    except ValueError:
      pass
  try:
    return architectures.for_model(cfg), cfg
  except ValueError as e:
    reason = str(e)
  # Names do not depend on what makes an architecture unable to export (e.g. an attention
  # pattern): take the first whose tensor map holds every Dense layer of the model.
  paths = {p for p, _ in lora.targets(model)}
  for arch in architectures.ARCHITECTURES.values():
    try:
      names = _linear_modules(arch, cfg)
    except Exception:  # pylint: disable=broad-except   (a map of another family)
      continue
    if paths <= set(names):
      return arch, cfg
  raise HFError("model", f"no Hugging Face architecture names this model's layers ({reason})")


def _linear_modules(arch: architectures.Architecture, cfg) -> dict[str, str]:
  """gemkit Dense path (``blocks/0/attn/q_proj``) -> HF Linear module
  (``model.layers.0.self_attn.q_proj``)."""
  out = {}
  for t in arch.tensors(cfg):
    if (t.path[-1] == "kernel" and t.transpose and t.to_gemkit is None
        and t.name.endswith(".weight")):
      out["/".join(map(str, t.path[:-1]))] = t.name[:-len(".weight")]
  return out


def module_names(model: nnx.Module,
                 base_name_or_path: str | pathlib.Path | None = None) -> dict[str, str]:
  """{gemkit Dense path: PEFT module name} of every Linear layer of ``model``'s
  architecture (``{"blocks/0/attn/q_proj": "model.layers.0.self_attn.q_proj", ...}``)."""
  return _linear_modules(*_architecture(model, base_name_or_path))


def _all_modules(arch: architectures.Architecture, cfg) -> set[str]:
  """Every module name of the HF model the tensor map implies (parents included)."""
  names = {"lm_head"}
  for t in arch.tensors(cfg):
    parts = t.name.split(".")[:-1]
    names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return names


def _leaf(module: str) -> str:
  return module.rsplit(".", 1)[-1]


def _target_modules(selected: set[str], all_modules: set[str]) -> list[str]:
  """PEFT's ``target_modules``: the leaf names when they select exactly ``selected``
  (PEFT matches a list entry t on ``key == t or key.endswith("." + t)``), else the
  full module names."""
  leaves = {_leaf(m) for m in selected}
  if {m for m in all_modules if _leaf(m) in leaves} == selected:
    return sorted(leaves)
  return sorted(selected, key=_natural)


def _natural(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --- export -------------------------------------------------------------------------------


def _adapter_name(model: nnx.Module, name: str | None) -> str:
  names = lora.adapter_names(model)
  if not names:
    raise HFError("model", "has no LoRA adapters (gemkit.surgery.lora.apply_lora adds them)")
  if name is not None:
    if name not in names:
      raise HFError("name", f"no adapter named {name!r}; adapters: {names}")
    return name
  active = {w.active for _, w in lora.wrappers(model)} - {None}
  if len(active) == 1:
    return active.pop()
  if len(names) == 1:
    return names[0]
  raise HFError("name", f"several adapters {names} and no single active one: pass name=")


def _init_from(config: Any) -> str | None:
  if config is None:
    return None
  block = config["model"] if "model" in config else config
  value = block.get("init_from") if hasattr(block, "get") else None
  return str(value) if value else None


def save_adapter(model: nnx.Module, out_dir: str | pathlib.Path, *, name: str | None = None,
                 base_name_or_path: str | pathlib.Path | None = None,
                 config: Any = None) -> pathlib.Path:
  """Writes adapter ``name`` (default: the active one) as a PEFT LoRA directory.

  ``out_dir`` gets ``adapter_config.json`` and ``adapter_model.safetensors``
  (float32 tensors, PEFT's key names), so that
  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
  out_dir)`` computes the adapted model's logits. PiSSA adapters are written
  converted to LoRA over the original base (rank 2r); QLoRA adapters as LoRA of
  the float base (module docstring).

  Args:
    model: a gemkit model with LoRA adapters (``gemkit.surgery.lora.apply_lora``), float
      or quantized base, of an architecture ``gemkit.hf`` maps.
    out_dir: created if missing; existing adapter files are replaced.
    name: the adapter (default: the active one, or the only one).
    base_name_or_path: ``base_model_name_or_path`` of the config (default:
      ``config.model.init_from``); a local Hugging Face directory also fixes the
      architecture whose module names are used.
    config: the run config (or its ``model`` block), for ``init_from``.
  Returns: ``out_dir`` as a Path.
  """
  tensors, peft_config = _export(model, name, base_name_or_path or _init_from(config))
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n",
                                    encoding="utf-8")
  return out


def check_exportable(model: nnx.Module, *, name: str | None = None,
                     base_name_or_path: str | pathlib.Path | None = None) -> None:
  """The HFError :func:`save_adapter` would raise, if any, without writing anything
  (e.g. before a fine-tuning run whose adapter is to be exported)."""
  _export(model, name, base_name_or_path)


def _export(model: nnx.Module, name: str | None,
            base_name_or_path: str | pathlib.Path | None) -> tuple[dict, dict]:
  """(safetensors dict, adapter_config.json dict) of adapter ``name``."""
  name = _adapter_name(model, name)
  arch, cfg = _architecture(model, base_name_or_path)
  linear = _linear_modules(arch, cfg)
  tensors: dict[str, np.ndarray] = {}
  settings: dict[str, dict] = {}         # module -> r, alpha, rslora, dora, dropout
  for path, w in lora.wrappers(model):
    if name not in w.adapters:
      continue
    module = linear.get(path)
    if module is None:
      raise HFError(path, f"adapter {name!r} adapts {path}, which is not a Linear layer of "
                    f"{arch.name}: PEFT has no module for it")
    adapter = w.adapters[name]
    rule = adapter.rule
    a = np.asarray(jax.device_get(adapter.a[...]), np.float32)       # [in, r]
    b = np.asarray(jax.device_get(adapter.b[...]), np.float32)       # [r, out]
    rank, alpha = rule.rank, float(rule.alpha)
    if rule.init == "pissa":             # W_res + s A B = W + s [A | A0] [B ; -B0]
      a0 = np.asarray(jax.device_get(adapter.principal_a[...]), np.float32)
      b0 = np.asarray(jax.device_get(adapter.principal_b[...]), np.float32)
      a, b = np.concatenate([a, a0], axis=1), np.concatenate([b, -b0], axis=0)
      rank, alpha = 2 * rank, alpha * (math.sqrt(2.0) if rule.rslora else 2.0)
    key = PREFIX + module
    tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.T)
    if rule.dora:
      tensors[key + ".lora_magnitude_vector"] = np.asarray(
          jax.device_get(adapter.magnitude[...]), np.float32)
    settings[module] = {"r": rank, "alpha": alpha, "use_rslora": rule.rslora,
                        "use_dora": rule.dora, "lora_dropout": rule.dropout}
  modules = sorted(settings, key=_natural)
  for key in ("use_rslora", "use_dora", "lora_dropout"):
    values = {settings[m][key] for m in modules}
    if len(values) > 1:
      first = next(m for m in modules if settings[m][key] != settings[modules[0]][key])
      raise HFError(first, f"adapter {name!r} has {key}={settings[first][key]} here but "
                    f"{settings[modules[0]][key]} on {modules[0]}: a PEFT config has one "
                    f"{key} for all layers")
  r = collections.Counter(settings[m]["r"] for m in modules).most_common(1)[0][0]
  alpha = collections.Counter(settings[m]["alpha"] for m in modules).most_common(1)[0][0]
  first = settings[modules[0]]
  peft_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": str(base_name_or_path) if base_name_or_path else None,
      "revision": None, "inference_mode": True,
      "r": r, "lora_alpha": _number(alpha), "lora_dropout": first["lora_dropout"],
      "use_rslora": first["use_rslora"], "use_dora": first["use_dora"],
      "target_modules": _target_modules(set(modules), _all_modules(arch, cfg)),
      "rank_pattern": {m: settings[m]["r"] for m in modules if settings[m]["r"] != r},
      "alpha_pattern": {m: _number(settings[m]["alpha"]) for m in modules
                        if settings[m]["alpha"] != alpha},
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "exclude_modules": None}
  return tensors, peft_config


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


# --- import -------------------------------------------------------------------------------


def _selects(pc: Mapping[str, Any], key: str, linear: set[str]) -> bool | None:
  """Whether PEFT's config ``pc`` adapts module ``key`` (``check_target_module_exists``);
  None when it names no target_modules (PEFT's per-model default)."""
  exclude = pc.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, key):
        return False
    elif key in exclude or any(key.endswith("." + e) for e in exclude):
      return False
  targets = pc.get("target_modules")
  if targets is None:
    return None
  if isinstance(targets, str):
    if targets == "all-linear":
      return key in linear and key != "lm_head"
    return bool(re.fullmatch(targets, key))
  if key in targets:
    return True
  if not any(key.endswith("." + t) for t in targets):
    return False
  indexes = pc.get("layers_to_transform")
  if indexes is None or (isinstance(indexes, list) and not indexes):
    return True
  pattern = pc.get("layers_pattern")
  if not pattern:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  else:
    match = None
    for p in [pattern] if isinstance(pattern, str) else pattern:
      match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
      if match:
        break
  if match is None:
    return False
  index = int(match.group("idx"))
  return index == indexes if isinstance(indexes, int) else index in indexes


def _pattern(patterns: Mapping[str, Any], module: str, default):
  """PEFT's ``get_pattern_key``: the first key k with ``(.*\\.)?(k)$`` matching."""
  for k, v in patterns.items():
    if re.match(rf"(.*\.)?({k})$", module):
      return v
  return default


def _check_config(pc: Mapping[str, Any], where: pathlib.Path) -> None:
  if pc.get("peft_type", "LORA") != "LORA":
    raise HFError(where, f"peft_type {pc.get('peft_type')!r} is not supported (LORA only)")
  for key in UNSUPPORTED:
    if pc.get(key):
      raise HFError(where, f"{key}={pc[key]!r} is not supported by gemkit's LoRA adapters")
  if pc.get("bias", "none") != "none":
    raise HFError(where, f"bias={pc['bias']!r} is not supported (the adapter would carry "
                  "trained base biases): only 'none'")
  init = pc.get("init_lora_weights", True)
  if init not in PLAIN_INITS and init != "pissa":
    raise HFError(where, f"init_lora_weights={init!r} is not supported: it changes the base "
                  "weights in a way gemkit cannot recompute (supported: true, false, "
                  "'gaussian', 'pissa'); convert it to LoRA with peft's "
                  "path_initial_model_for_weight_conversion")
  r = pc.get("r")
  if not isinstance(r, int) or r < 1:
    raise HFError(where, f"r must be an int >= 1, got {r!r}")


def _read_tensors(path: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
  """module -> {"A", "B", "m"} arrays of a PEFT safetensors file."""
  out: dict[str, dict[str, np.ndarray]] = {}
  try:
    handle = safe_open(str(path), framework="np")
  except Exception as e:  # pylint: disable=broad-except
    raise HFError(path, f"not a readable safetensors file ({e})") from None
  with handle as f:
    keys = list(f.keys())
    # The most telling refusal first: an embedding adapter also saves the embedding itself.
    for key in sorted(keys, key=lambda k: ("lora_embedding_" not in k, ".lora_B.bias" not in k)):
      k = key[len(PREFIX):] if key.startswith(PREFIX) else key
      field = next(((s, v) for s, v in SUFFIXES.items() if k.endswith(s)), None)
      if field is None:
        if "lora_embedding_" in k:
          why = "an Embedding adapter (gemkit adapts Linear layers only)"
        elif k.endswith(".lora_B.bias"):
          why = "a LoRA bias (lora_bias), which gemkit's adapters do not have"
        else:
          why = ("not a LoRA tensor (lora_A / lora_B / lora_magnitude_vector): a base "
                 "weight saved with the adapter (modules_to_save, save_embedding_layers) is "
                 "not supported")
        raise HFError(path, f"tensor {key}: {why}")
      suffix, name = field
      out.setdefault(k[:-len(suffix)], {})[name] = f.get_tensor(key)
  return out


def load_adapter(model: nnx.Module, peft_dir: str | pathlib.Path, *, name: str = "default",
                 activate: bool = True) -> nnx.Module:
  """Adds the PEFT LoRA adapter in ``peft_dir`` to ``model`` as adapter ``name``.

  ``peft_dir`` holds ``adapter_config.json`` and ``adapter_model.safetensors``
  (a pickled ``adapter_model.bin`` is refused). The Dense layers of the
  modules the adapter holds tensors for are wrapped by ``gemkit.surgery.lora``
  (``apply_lora``: one rule per module with its rank and alpha from ``r`` /
  ``rank_pattern`` and ``lora_alpha`` / ``alpha_pattern``; ``use_rslora``,
  ``use_dora``, ``lora_dropout``) and their ``a``, ``b`` (and DoRA
  magnitude) set from the file. ``target_modules`` (a list, a regex or
  ``"all-linear"``, with ``exclude_modules`` / ``layers_to_transform``) must
  select exactly those modules among the model's Linear layers.

  ``model`` is changed in place and returned; on any mismatch (a module the
  model lacks, another shape or rank) it is left as it was and an
  ``HFError`` (a ValueError) names the module.
  """
  d = pathlib.Path(peft_dir)
  if not d.is_dir():
    raise HFError(d, "not a directory (a PEFT adapter directory holds adapter_config.json "
                  "and adapter_model.safetensors)")
  weights, config_path = d / ADAPTER_WEIGHTS, d / ADAPTER_CONFIG
  if not weights.is_file():
    pickles = [p for p in PICKLES if (d / p).is_file()]
    if pickles:
      raise HFError(d, f"holds only a pickled adapter ({', '.join(pickles)}); gemkit never "
                    "unpickles: re-save it with save_pretrained(dir, safe_serialization=True) "
                    "in peft")
    raise HFError(weights, "no such file")
  pc = read_json(config_path)
  _check_config(pc, config_path)
  arch, cfg = _architecture(model)
  linear = _linear_modules(arch, cfg)                  # gemkit path -> HF module
  path_of = {m: p for p, m in linear.items()}
  layers_ = dict(lora.targets(model))
  found = _read_tensors(weights)
  if not found:
    raise HFError(weights, "holds no LoRA tensors")

  rules, values = [], {}
  for module in sorted(found, key=_natural):
    arrays = found[module]
    path = path_of.get(module)
    if path is None or path not in layers_:
      raise HFError(weights, f"the adapter adapts {module}, which this {arch.name} model does "
                    f"not have as a Linear layer (it has {len(path_of)}: "
                    f"{', '.join(sorted(path_of, key=_natural)[:3])}, ...): another base")
    for part in ("A", "B"):
      if part not in arrays:
        raise HFError(weights, f"{module}: lora_{part}.weight is missing")
    if _selects(pc, module, set(path_of)) is False:
      raise HFError(config_path, f"{module} has adapter tensors, but target_modules "
                    f"{pc.get('target_modules')!r} does not select it")
    r = int(_pattern(pc.get("rank_pattern") or {}, module, pc["r"]))
    alpha = float(_pattern(pc.get("alpha_pattern") or {}, module, pc.get("lora_alpha", 8)))
    layer = layers_[path]
    a, b = arrays["A"], arrays["B"]
    want_a, want_b = (r, layer.in_features), (layer.out_features, r)
    if a.shape != want_a or b.shape != want_b:
      raise HFError(weights, f"{module}: lora_A is {list(a.shape)} and lora_B "
                    f"{list(b.shape)}; this base's layer ({path}, [in {layer.in_features}, out "
                    f"{layer.out_features}]) with r={r} needs {list(want_a)} and "
                    f"{list(want_b)}: the adapter was made for another base")
    dora = bool(pc.get("use_dora", False))
    if dora != ("m" in arrays):
      raise HFError(weights, f"{module}: use_dora is {dora} but lora_magnitude_vector is "
                    f"{'present' if 'm' in arrays else 'missing'}")
    if dora and arrays["m"].shape != (layer.out_features,):
      raise HFError(weights, f"{module}: lora_magnitude_vector is {list(arrays['m'].shape)}, "
                    f"this base's layer has {layer.out_features} outputs")
    try:
      rules.append(lora.LoRARule(
          targets=re.escape(path), rank=r, alpha=alpha, dropout=float(pc.get("lora_dropout", 0)),
          rslora=bool(pc.get("use_rslora", False)), dora=dora,
          init="pissa" if pc.get("init_lora_weights") == "pissa" else "standard"))
    except ValueError as e:
      raise HFError(config_path, f"{module}: {e}") from None
    values[path] = arrays
  unloaded = [m for p, m in linear.items() if p in layers_ and m not in found
              and _selects(pc, m, set(path_of))]
  if unloaded:
    raise HFError(weights, f"target_modules selects {sorted(unloaded, key=_natural)[0]} "
                  f"({len(unloaded)} such modules), but the file holds no tensors for it")
  try:
    lora.apply_lora(model, rules, name=name, activate=activate)
  except ValueError as e:
    raise HFError(d, str(e)) from None
  wrapped = dict(lora.wrappers(model))
  for path, arrays in values.items():
    adapter = wrapped[path].adapters[name]
    adapter.a[...] = jnp.asarray(np.asarray(arrays["A"], np.float32).T)
    adapter.b[...] = jnp.asarray(np.asarray(arrays["B"], np.float32).T)
    if "m" in arrays:
      adapter.magnitude[...] = jnp.asarray(np.asarray(arrays["m"], np.float32))
  return model
