"""LoRA, DoRA, PiSSA and QLoRA adapters on ``models.layers.Dense``, selected by regex.

>>> model = lora.apply_lora(model, lora.LoRARule("all-linear", rank=8, alpha=16))
>>> trainer = train.Trainer(cfg, workdir, model_fn=lambda: model,
...                         trainable=lora.trainable())       # only the adapters train

``apply_lora`` wraps each selected Dense in a :class:`LoRADense` (the Dense
itself is unchanged: it is the wrapper's ``base``, float or quantized) and
gives it one named :class:`Adapter`. For a Dense ``y = x W (+ b)``,
``W [in, out]``, ``x [..., in]``, and ``s`` the adapter's scaling:

* LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
  ``y = x W + s (drop(x) A) B``, ``A [in, r]``, ``B [r, out]``,
  ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023,
  "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").
  Standard init: ``A ~ N(0, 1/in)``, ``B = 0``, so at step 0 the adapted
  model's outputs are the base model's, bit for bit (the adapter adds an
  exact zero). Deviation: the paper and PEFT draw A from a Gaussian /
  Kaiming-uniform of another scale; ``1/in`` keeps ``x A`` at unit scale.
* PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation"): with ``W = U S V^T``, ``A0 = U_r S_r^{1/2} / sqrt(s)``,
  ``B0 = S_r^{1/2} V_r^T / sqrt(s)`` (so ``s A0 B0`` is W's best rank-r
  part) and the frozen base becomes the residual ``W_res = W - s A0 B0``.
  Outputs at step 0 equal the base's up to float rounding. A0 and B0 are
  kept (frozen) so an adapter checkpoint can rebuild ``W_res`` from the
  original base. Exact SVD (the paper's fast randomized SVD is not used);
  float bases only: for QPiSSA apply PiSSA first, then quantize
  the model (``gemkit.surgery.quantize``) (it quantizes the residual).
* DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):
  ``W' = m * V / ||V||_c`` with ``V = W + s A B``, ``||.||_c`` the norm of
  each output unit's weights (over ``in``: the paper's column norm of its
  ``[out, in]`` matrix) and the magnitude ``m [out]`` trained, initialised
  to ``||W||_c``. As the paper (Section 4.3) and PEFT do, ``||V||_c`` is a
  constant for the gradient. It is computed without forming V:
  ``||V||_c^2 = ||W||_c^2 + 2 s sum_k (A^T W)_kj B_kj + s^2 sum((A^T A B) * B)_j``
  with ``||W||_c`` stored at init, ``A^T W`` one (quantized) matmul of
  ``r`` rows: a quantized base is never dequantized. With ``g = m / ||V||_c``
  the output is ``y = y0 + (g - 1) (drop(x) W) + g s (drop(x) A) B``
  (``y0`` the base output; PEFT's form, exact for any dropout). ``g - 1``
  is computed as ``(m - ||V||_c) / ||V||_c``: at init ``B = 0`` makes
  ``||V||_c = sqrt(||W||_c^2) = m`` exactly, so standard-init DoRA also
  starts bit for bit equal, however the compiler rewrites the division.
* QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
  LLMs"): the base Dense held as ``ops.quant`` nf4 / int4 weights
  (``gemkit.surgery.quantize``) and float adapters; the gradient reaches x (hence the
  adapters of earlier layers) through ``quantized_matmul``'s custom VJP
  ``dx = g dequant(W)^T``.

Adapter parameters are ``nnx.LoRAParam``, so ``trainable()`` (or plain
``nnx.LoRAParam``) as ``Trainer``'s trainable filter makes the optimizer and
the gradient see only them; the base and the frozen adapter arrays
(:class:`AdapterState`) stay in ``TrainState.frozen``. Several named
adapters can sit on one base (``apply_lora(..., name=...)``); ``set_active``
selects one (or none). ``merge`` folds an adapter into a float base
(``W <- W + s A B``; DoRA ``W <- g (W + s A B)``) for adapter-free serving,
``unmerge`` subtracts it again (exact up to float rounding); ``unwrap``
returns the plain base modules. ``save_adapter`` / ``load_adapter`` write and
read one adapter alone (orbax) with the fingerprint of the base it was
trained on (:func:`fingerprint`: the model config and every base array), so
loading it onto another base is a one-line error.

Module paths are the attribute paths of the model joined by ``/``
(``blocks/0/attn/q_proj``, ``gemkit.surgery.paths``); a rule's regex must
match a whole path (``re.fullmatch``), written with ``/`` or, PEFT-style,
``.`` separators (``.*attn\\.(q|k|v|o)_proj``). ``"all-linear"`` is every
Dense but an untied LM head (``head``), as PEFT's option of that name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemkit import checkpoint as ckpt_lib
from gemkit.config import ConfigError
from gemkit.surgery import paths, quantize
from models import layers
from ops import quant

ALL_LINEAR = "all-linear"
INITS = ("standard", "pissa")
DEFAULT_NAME = "default"
FORMAT = "gemkit-lora-1"
_HEAD = re.compile(r"(.*/)?head")


class AdapterState(nnx.Variable):
  """Frozen adapter arrays (PiSSA's initial factors, DoRA's base norm, a merge scale).

  Not an ``nnx.Param``: never trained, but saved with the adapter.
  """


@dataclasses.dataclass(frozen=True)
class LoRARule:
  """Which Dense layers get an adapter, and its shape and init.

  Args:
    targets: regex over module paths (full match, ``/`` or ``.`` separators)
      or ``"all-linear"``.
    rank: r >= 1 (at most min(in, out)).
    alpha: scaling numerator: s = alpha / r (alpha / sqrt(r) with rslora).
    dropout: dropout rate on the adapter's input while training.
    rslora: rank-stabilized scaling.
    init: ``"standard"`` (B = 0) or ``"pissa"``.
    dora: weight-decomposed (magnitude and direction) adaptation.
  """

  targets: str = ALL_LINEAR
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False
  init: str = "standard"
  dora: bool = False

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
    if self.init not in INITS:
      raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
    if self.targets != ALL_LINEAR:
      try:
        re.compile(self.targets)
      except re.error as e:
        raise ValueError(f"targets regex {self.targets!r} is invalid: {e}") from None

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def matches(self, path: str) -> bool:
    if self.targets == ALL_LINEAR:
      return not _HEAD.fullmatch(path)
    return bool(re.fullmatch(self.targets, path) or
                re.fullmatch(self.targets, path.replace("/", ".")))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


RuleLike = LoRARule | Mapping[str, Any]


def parse_rules(rules: RuleLike | Sequence[RuleLike]) -> list[LoRARule]:
  """A rule, a dict of LoRARule fields, or a list of them -> [LoRARule]."""
  items = [rules] if isinstance(rules, (LoRARule, Mapping)) else list(rules)
  if not items:
    raise ValueError("rules is empty: give at least one LoRARule")
  out = []
  for r in items:
    if isinstance(r, LoRARule):
      out.append(r)
    elif isinstance(r, Mapping):
      unknown = sorted(set(r) - {f.name for f in dataclasses.fields(LoRARule)})
      if unknown:
        raise ValueError(f"unknown LoRA rule keys {unknown}")
      out.append(LoRARule(**r))
    else:
      raise ValueError(f"a LoRA rule must be a LoRARule or a dict, got {r!r}")
  return out


# --- the wrapper -----------------------------------------------------------------


def _names(dense: layers.Dense) -> tuple[Any, Any]:
  """The logical (in, out) axis names of a float or quantized Dense's weight."""
  var = dense.kernel if dense.kernel is not None else dense.quantized["values"]
  return tuple(var.get_metadata().get("out_sharding") or (None, None))


def _weight(dense: layers.Dense) -> jax.Array:
  """W [in, out] float32 (dequantized if quantized)."""
  if dense.is_quantized:
    return quant.dequantize(dense.quantized_weight(), jnp.float32)
  return dense.kernel[...].astype(jnp.float32)


def _times_weight(dense: layers.Dense, x: jax.Array) -> jax.Array:
  """x @ W (no bias, weight-only even if the layer quantizes activations)."""
  if dense.is_quantized:
    return quant.quantized_matmul(x, dense.quantized_weight(), impl=dense.impl)
  return jnp.dot(x, dense.kernel[...].astype(x.dtype))


def _param(value: jax.Array, names) -> nnx.LoRAParam:
  return nnx.LoRAParam(value, out_sharding=tuple(names), eager_sharding=False)


def _state(value: jax.Array, names) -> AdapterState:
  return AdapterState(value, out_sharding=tuple(names), eager_sharding=False)


class Adapter(nnx.Module):
  """One adapter of a :class:`LoRADense`: ``a`` [in, r], ``b`` [r, out] (+ DoRA, PiSSA).

  ``magnitude`` [out] (LoRAParam) and ``base_norm`` [out] (AdapterState,
  ``||W||_c``) exist with DoRA; ``principal_a`` / ``principal_b`` (AdapterState,
  A0 and B0) with PiSSA.
  """

  def __init__(self, base: layers.Dense, rule: LoRARule, key: jax.Array, *,
               decompose: bool = True):
    k_in, n_out, r = base.in_features, base.out_features, rule.rank
    in_name, out_name = _names(base)
    self.rule = rule
    key_a, key_drop = jax.random.split(key)
    a = jax.random.normal(key_a, (k_in, r), jnp.float32) * k_in ** -0.5
    b = jnp.zeros((r, n_out), jnp.float32)
    self.principal_a = self.principal_b = None
    if rule.init == "pissa":
      if decompose:
        a, b = _principal_factors(base.kernel[...], r, rule.scaling)
      else:                     # placeholders: load_adapter restores A0, B0 and W_res
        a = jnp.zeros((k_in, r), jnp.float32)
      self.principal_a = nnx.data(_state(a, (in_name, None)))
      self.principal_b = nnx.data(_state(b, (None, out_name)))
    self.a = _param(a, (in_name, None))
    self.b = _param(b, (None, out_name))
    self.magnitude = self.base_norm = None
    self.merge_scale = None       # g of a merged DoRA adapter (for unmerge)
    self.dropout = (nnx.Dropout(rule.dropout, deterministic=True,
                                rngs=nnx.Rngs(dropout=key_drop)) if rule.dropout else None)

  @property
  def scaling(self) -> float:
    return self.rule.scaling

  def init_dora(self, base: layers.Dense) -> None:
    """m = ||W + s A B||_c and the stored ||W||_c (after any PiSSA residual)."""
    out_name = _names(base)[1]
    w = _weight(base)
    self.base_norm = nnx.data(_state(jnp.sqrt(jnp.sum(w * w, axis=0)), (out_name,)))
    m = self.base_norm[...] if self.rule.init == "standard" else self.column_norm(base)
    self.magnitude = nnx.data(_param(m, (out_name,)))

  def delta(self) -> jax.Array:
    """s A B [in, out] float32."""
    return self.scaling * jnp.dot(self.a[...], self.b[...])

  def column_norm(self, base: layers.Dense) -> jax.Array:
    """||W + s A B||_c [out] without forming it (module docstring), float32."""
    a, b, s = self.a[...], self.b[...], self.scaling
    at_w = _times_weight(base, a.T.astype(base.dtype)).astype(jnp.float32)     # [r, out]
    cross = jnp.sum(at_w * b, axis=0)
    square = jnp.sum(jnp.dot(jnp.dot(a.T, a), b) * b, axis=0)
    n0 = self.base_norm[...]
    return jnp.sqrt(jnp.maximum(n0 * n0 + 2.0 * s * cross + s * s * square, 0.0))

  def dora_scale(self, base: layers.Dense) -> jax.Array:
    """g = m / ||W + s A B||_c [out], the norm a constant for the gradient (DoRA §4.3)."""
    return self.magnitude[...] / jax.lax.stop_gradient(self.column_norm(base))

  def __call__(self, x: jax.Array, y0: jax.Array, base: layers.Dense) -> jax.Array:
    """The adapted output, given the input x [..., in] and the base output y0 [..., out]."""
    dtype = base.dtype
    xd = x if self.dropout is None else self.dropout(x)
    h = jnp.dot(xd.astype(dtype), self.a[...].astype(dtype))
    delta = self.scaling * jnp.dot(h, self.b[...].astype(dtype))
    if not self.rule.dora:
      return y0 + delta
    # g - 1 as (m - norm) / norm: exactly 0 while m == norm (at init), however XLA divides.
    norm = jax.lax.stop_gradient(self.column_norm(base))
    g1 = ((self.magnitude[...] - norm) / norm).astype(dtype)
    if self.dropout is not None:
      lin = _times_weight(base, xd.astype(dtype))
    else:
      lin = y0 if base.bias is None else y0 - base.bias[...].astype(dtype)
    return y0 + g1 * lin + (1.0 + g1) * delta


def _principal_factors(w: jax.Array, r: int, s: float) -> tuple[jax.Array, jax.Array]:
  """PiSSA's A0 [in, r], B0 [r, out] with s A0 B0 = the rank-r truncated SVD of w."""
  u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(sv[:r] / s)
  return u[:, :r] * root[None, :], root[:, None] * vt[:r]


class LoRADense(nnx.Module):
  """A Dense with named adapters: ``y = base(x)`` adapted by the ``active`` one.

  ``base`` is the original :class:`models.layers.Dense` (float or quantized),
  unchanged except by PiSSA (its residual) and ``merge``. ``active`` names
  the adapter in use (None: the base alone); ``merged`` the one folded into
  ``base`` (skipped in the forward pass while active).
  """

  def __init__(self, base: layers.Dense, base_fingerprint: str):
    self.base = base
    self.adapters = nnx.Dict()
    self.active: str | None = None
    self.merged: str | None = None
    self.base_fingerprint = base_fingerprint

  @property
  def in_features(self) -> int:
    return self.base.in_features

  @property
  def out_features(self) -> int:
    return self.base.out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    if self.active is None or self.active == self.merged:
      return y
    return self.adapters[self.active](x, y, self.base)


# --- surgery ----------------------------------------------------------------------------


def _targets(model: nnx.Module) -> list[tuple[tuple, layers.Dense | LoRADense]]:
  found = []
  for path, m in nnx.iter_modules(model):
    if isinstance(m, LoRADense) or (isinstance(m, layers.Dense) and not (
        path and path[-1] == "base" and isinstance(paths.get(model, path[:-1]), LoRADense))):
      found.append((tuple(path), m))
  return found


def targets(model: nnx.Module) -> list[tuple[str, layers.Dense | LoRADense]]:
  """(path, module) of every adaptable layer: LoRADense wrappers and bare Dense layers."""
  return [(paths.join(p), m) for p, m in _targets(model)]


def wrappers(model: nnx.Module) -> list[tuple[str, LoRADense]]:
  """(path, LoRADense) of every wrapped layer."""
  return [(p, m) for p, m in targets(model) if isinstance(m, LoRADense)]


def _check_name(name: str) -> None:
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
    raise ValueError(f"adapter name must be an identifier, got {name!r}")


def _check_layer(path: str, module, rule: LoRARule, name: str) -> None:
  """ValueError if adapter ``name`` by ``rule`` cannot go on this layer."""
  where = f"{path} [{module.in_features}, {module.out_features}]"
  if rule.rank > min(module.in_features, module.out_features):
    raise ValueError(f"{where}: rank {rule.rank} exceeds min(in, out)")
  if not isinstance(module, LoRADense):
    base = module
  else:
    base = module.base
    if name in module.adapters:
      raise ValueError(f"{where}: already has an adapter named {name!r}")
    if module.merged is not None:
      raise ValueError(f"{where}: adapter {module.merged!r} is merged; unmerge it first")
    if len(module.adapters) and (rule.init == "pissa" or any(
        a.rule.init == "pissa" for a in module.adapters.values())):
      raise ValueError(f"{where}: a PiSSA adapter replaces the base weight by its residual; "
                       f"it cannot share the layer (adapters {list(module.adapters)})")
  if rule.init == "pissa" and base.is_quantized:
    raise ValueError(f"{where}: PiSSA needs a float base (it replaces W by its residual): "
                     "apply it before quantizing; gemkit.surgery.quantize then quantizes the residual")


def apply_lora(model: nnx.Module, rules: RuleLike | Sequence[RuleLike], *,
               name: str = DEFAULT_NAME, seed: int = 0, activate: bool = True,
               base_fingerprint: str | None = None, _decompose: bool = True) -> nnx.Module:
  """Adds adapter ``name`` to the Dense layers ``rules`` select, in place; returns ``model``.

  Every rule and layer is checked before anything changes: on a ValueError
  (naming the layer or rule) the model is as it was.

  Args:
    model: an NNX model built from ``models.layers.Dense`` (float or
      quantized), possibly already carrying adapters.
    rules: LoRARules (or dicts); each layer takes the first rule
      that matches its path. A rule that matches no layer is an error.
    name: the adapter's name (an identifier); must be new on every layer.
    seed: seeds A's Gaussian init and the dropout streams.
    activate: make ``name`` the active adapter of the layers it adapts.
    base_fingerprint: the base's :func:`fingerprint` to record (default:
      computed from ``model`` if it has no adapters yet, else kept). Pass
      the float model's fingerprint when ``model`` is its quantized copy.
  """
  _check_name(name)
  parsed = parse_rules(rules)
  found = _targets(model)
  chosen = paths.select([paths.join(p) for p, _ in found], [r.matches for r in parsed],
                        names=[r.targets for r in parsed], what="LoRA")
  plan = [(path, module, parsed[i]) for (path, module), i in zip(found, chosen) if i is not None]
  for path, module, rule in plan:
    _check_layer(paths.join(path), module, rule, name)
  if base_fingerprint is None:
    known = {w.base_fingerprint for _, w in wrappers(model)}
    base_fingerprint = known.pop() if len(known) == 1 else fingerprint(model)
  key = jax.random.key(seed)
  for i, (path, module, rule) in enumerate(plan):
    wrapper = module if isinstance(module, LoRADense) else LoRADense(module, base_fingerprint)
    adapter = Adapter(wrapper.base, rule, jax.random.fold_in(key, i), decompose=_decompose)
    if rule.init == "pissa":
      w = wrapper.base.kernel
      w[...] = (w[...].astype(jnp.float32) - adapter.delta()).astype(w.dtype)
    if rule.dora:
      adapter.init_dora(wrapper.base)
    wrapper.adapters[name] = adapter
    if activate:
      wrapper.active = name
    if wrapper is not module:
      paths.put(model, path, wrapper)
  return model


def set_active(model: nnx.Module, name: str | None) -> nnx.Module:
  """Selects adapter ``name`` on every layer that has it (None: the base alone)."""
  ws = wrappers(model)
  if name is not None and not any(name in w.adapters for _, w in ws):
    raise ValueError(f"no adapter named {name!r}; adapters: {adapter_names(model)}")
  for _, w in ws:
    w.active = name if (name is None or name in w.adapters) else None
  return model


def adapter_names(model: nnx.Module) -> list[str]:
  return sorted({n for _, w in wrappers(model) for n in w.adapters})


def trainable(name: str | None = None):
  """An nnx filter of the adapter parameters (of adapter ``name``, or of all)."""
  if name is None:
    return nnx.LoRAParam

  def only(path, var):
    return (isinstance(var, nnx.LoRAParam) and "adapters" in path
            and path[list(path).index("adapters") + 1] == name)
  return only


def count(model: nnx.Module, name: str | None = None) -> tuple[int, int]:
  """(trainable adapter parameters, all parameters) of ``model``.

  All parameters are the base's (a quantized weight counts its logical
  ``in * out`` elements) plus every adapter's; frozen adapter arrays
  (:class:`AdapterState`) are buffers, not counted.
  """
  size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  quantized = sum(int(np.prod(d.quant_layout[1])) for _, d in paths.dense_layers(model)
                  if d.is_quantized)
  return size(nnx.state(model, trainable(name))), size(nnx.state(model, nnx.Param)) + quantized


# --- merge, unmerge, unwrap -------------------------------------------------------


def merge(model: nnx.Module, name: str | None = None) -> nnx.Module:
  """Folds adapter ``name`` (default: each layer's active one) into its float base, in place.

  LoRA: ``W <- W + s A B``; DoRA: ``W <- g (W + s A B)`` with ``g = m / ||W + s A B||_c``
  (kept for :func:`unmerge`). The forward pass then skips the merged adapter.
  """
  for path, w in wrappers(model):
    n = name or w.active
    if n is None or n not in w.adapters:
      continue
    if w.merged is not None:
      raise ValueError(f"{path}: adapter {w.merged!r} is already merged")
    if w.base.is_quantized:
      raise ValueError(f"{path}: the base is quantized ({w.base.quant_layout[0]}); merging "
                       "would re-quantize it: merge into the float base instead")
    a = w.adapters[n]
    kernel = w.base.kernel
    new = kernel[...].astype(jnp.float32) + a.delta()
    if a.rule.dora:
      g = a.dora_scale(w.base)
      a.merge_scale = nnx.data(_state(g, (_names(w.base)[1],)))
      new = new * g[None, :]
    kernel[...] = new.astype(kernel.dtype)
    w.merged = n
  return model


def unmerge(model: nnx.Module) -> nnx.Module:
  """Undoes :func:`merge`: ``W <- W - s A B`` (DoRA: ``W / g - s A B``), in place.

  Exact up to float rounding (``(W + d) - d`` need not be W bit for bit).
  """
  for _, w in wrappers(model):
    if w.merged is None:
      continue
    a = w.adapters[w.merged]
    kernel = w.base.kernel
    value = kernel[...].astype(jnp.float32)
    if a.rule.dora:
      value = value / a.merge_scale[...][None, :]
      a.merge_scale = nnx.data(None)
    kernel[...] = (value - a.delta()).astype(kernel.dtype)
    w.merged = None
  return model


def unwrap(model: nnx.Module) -> nnx.Module:
  """Replaces every LoRADense by its base Dense, in place (after ``merge``: the merged model).

  A PiSSA layer's base is its residual: merge it first (or it loses the
  principal part).
  """
  for path, w in _targets(model):
    if isinstance(w, LoRADense):
      paths.put(model, path, w.base)
  return model


# --- fingerprints and adapter checkpoints ------------------------------------------------


def fingerprint(model: nnx.Module) -> str:
  """sha256 (16 hex) of a base model: its config and every array, in path order.

  For a model with adapters, the fingerprint recorded when they were applied.
  """
  known = {w.base_fingerprint for _, w in wrappers(model)}
  if known:
    if len(known) > 1:
      raise ValueError(f"adapters on this model were applied to different bases: {known}")
    return known.pop()
  digest = hashlib.sha256()
  cfg = getattr(model, "cfg", None)
  if dataclasses.is_dataclass(cfg):
    digest.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
  flat = sorted(nnx.to_flat_state(nnx.state(model)), key=lambda kv: paths.join(kv[0]))
  for path, var in flat:
    value = var[...] if isinstance(var, nnx.Variable) else var
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    value = np.asarray(jax.device_get(value))
    digest.update(f"{paths.join(path)}:{value.dtype}:{value.shape};".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]


def adapter_arrays(model: nnx.Module, name: str) -> dict:
  """{layer path: {variable: array}} of adapter ``name`` (LoRAParams and AdapterState)."""
  out = {}
  for path, w in wrappers(model):
    if name in w.adapters:
      a = w.adapters[name]
      out[path] = {k: v[...] for k, v in vars(a).items()
                   if isinstance(v, (nnx.LoRAParam, AdapterState)) and k != "merge_scale"}
  if not out:
    raise ValueError(f"no adapter named {name!r}; adapters: {adapter_names(model)}")
  return out


def _nest(flat: Mapping[str, dict]) -> dict:
  """{"a/0/b": v} -> {"a": {"0": {"b": v}}} (orbax keeps nested string keys)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _unnest(tree: Mapping[str, Any], paths: Iterable[str]) -> dict:
  out = {}
  for path in paths:
    node = tree
    for p in path.split("/"):
      node = node[p]
    out[path] = node
  return out


def save_adapter(model: nnx.Module, directory: str | pathlib.Path, *, name: str | None = None,
                 step: int = 0, base_info: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes adapter ``name`` alone (orbax) under ``directory``; returns the step directory.

  The metadata records the rules, each layer's shape, the base's
  :func:`fingerprint` and ``base_info`` (e.g. the base run directory, step
  and quantization rules), which :func:`load_adapter` checks.
  """
  names = adapter_names(model)
  name = name or (names[0] if len(names) == 1 else None)
  if name is None:
    raise ValueError(f"several adapters {names}: pass name=")
  arrays = adapter_arrays(model, name)
  ws = dict(wrappers(model))
  rules = {p: ws[p].adapters[name].rule.to_dict() for p in arrays}
  meta = {"format": FORMAT, "name": name,
          "layers": {p: {"shape": [ws[p].in_features, ws[p].out_features], "rule": rules[p]}
                     for p in arrays},
          "trainable_params": count(model, name)[0],
          "base": {"fingerprint": fingerprint(model), **dict(base_info or {})}}
  with ckpt_lib.Checkpointer(directory, keep=1, async_save=False) as checkpointer:
    checkpointer.save(step, _nest(jax.device_get(arrays)), meta, force=True)
  return pathlib.Path(directory) / str(step)


def read_adapter_meta(directory: str | pathlib.Path, step: int | None = None) -> tuple[int, dict]:
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise ConfigError("adapter", f"no adapter checkpoint at {directory}")
  with ckpt_lib.Checkpointer(directory, async_save=False) as checkpointer:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise ConfigError("adapter", f"no complete adapter checkpoint under {directory}")
    meta = checkpointer.meta(step)
  if meta.get("format") != FORMAT:
    raise ConfigError("adapter", f"{directory} is not a gemkit adapter checkpoint "
                      f"(format {meta.get('format')!r})")
  return step, meta


def check_base(model: nnx.Module, meta: Mapping[str, Any], where: str) -> None:
  """ConfigError (one line) unless ``model`` is the base the adapter ``meta`` was trained on."""
  layers_ = dict(targets(model))
  for path, info in meta["layers"].items():
    module = layers_.get(path)
    if module is None:
      raise ConfigError("adapter", f"{where} adapts layer {path}, which this base does not "
                        f"have (it has {len(layers_)} Dense layers: {list(layers_)[:3]} ...)")
    shape = [module.in_features, module.out_features]
    if shape != info["shape"]:
      raise ConfigError("adapter", f"{where} was trained on a base whose {path} is "
                        f"{info['shape']}; this base's is {shape}: wrong base model")
  saved, current = meta["base"]["fingerprint"], fingerprint(model)
  if saved != current:
    source = meta["base"].get("workdir")
    trained_on = f"{saved} ({source} step {meta['base'].get('step')})" if source else saved
    raise ConfigError("adapter", f"{where} was trained on base {trained_on}, but this base's "
                      f"fingerprint is {current}: load it onto the base it was trained on")


def load_adapter(model: nnx.Module, directory: str | pathlib.Path, *, name: str | None = None,
                 step: int | None = None, activate: bool = True) -> nnx.Module:
  """Adds the adapter saved under ``directory`` to ``model`` (in place); returns ``model``.

  ``model`` must be the base the adapter was trained on (same layer shapes
  and :func:`fingerprint`, else a one-line ConfigError). If the adapter was
  trained on a quantized copy (QLoRA; ``base_info["quantization"]``) and
  ``model`` is the float base, it is quantized the same way first (a new
  model is returned then).
  """
  directory = pathlib.Path(directory)
  step, meta = read_adapter_meta(directory, step)
  check_base(model, meta, str(directory))
  rules_json = (meta["base"].get("quantization") or {}).get("rules")
  if rules_json and not any(d.is_quantized for _, d in paths.dense_layers(model)):
    fp = fingerprint(model)
    model, _ = quantize.quantize_model(model, rules_json)
  else:
    fp = None
  name = name or meta["name"]
  rules = [LoRARule(**{**info["rule"], "targets": re.escape(path)})
           for path, info in meta["layers"].items()]
  apply_lora(model, rules, name=name, activate=activate, base_fingerprint=fp, _decompose=False)
  ws = dict(wrappers(model))
  target = _nest({p: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrs.items()}
                  for p, arrs in adapter_arrays(model, name).items()})
  with ckpt_lib.Checkpointer(directory, async_save=False) as checkpointer:
    restored = checkpointer.restore(step, target)
  for path, arrs in _unnest(restored, meta["layers"]).items():
    adapter = ws[path].adapters[name]
    for k, v in arrs.items():
      getattr(adapter, k)[...] = jnp.asarray(v)
    if adapter.rule.init == "pissa":     # the base becomes the residual it was trained on
      kernel = ws[path].base.kernel
      principal = adapter.scaling * jnp.dot(adapter.principal_a[...], adapter.principal_b[...])
      kernel[...] = (kernel[...].astype(jnp.float32) - principal).astype(kernel.dtype)
  return model
