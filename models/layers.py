"""Shared Flax NNX layers: Dense, Embed, RMSNorm, RoPE, gated MLP.

Parameters carry logical axis names (``out_sharding`` metadata) that
``gemkit.sharding`` maps onto the device mesh; :func:`constrain` does the same
for activations when a mesh and rules are in force and is a no-op otherwise.
Weights are ``[in, out]``; activations ``[batch, seq, ...]``. A :class:`Dense`
can hold its weight quantized (``ops.quant``), stored as :class:`QuantizedKernel`
variables, which are not ``nnx.Param``: optimizers never see them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

from ops import common, quant

Initializer = Callable[..., jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], dtype,
          names: Sequence[str | None]) -> nnx.Param:
  """An ``nnx.Param`` initialised with ``init`` and tagged with logical axis names."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(names), eager_sharding=False)


def _mesh_and_rules():
  """The active abstract mesh and logical rules, or None when either is missing."""
  rules = spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  return None if not rules or mesh.empty else (mesh, rules)


def _spec(names: Sequence[str | None] | None, rules) -> jax.sharding.PartitionSpec:
  if names is None:
    return jax.sharding.PartitionSpec()
  from flax import linen  # pylint: disable=g-import-not-at-top
  return linen.logical_to_mesh_axes(tuple(names), rules)


def _shards(mesh, entry) -> int:
  """Devices a PartitionSpec entry (None, an axis or a tuple of axes) splits a dim over."""
  axes = (entry,) if isinstance(entry, str) else entry or ()
  return math.prod(mesh.shape[a] for a in axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names, if a mesh and rules are set."""
  active = _mesh_and_rules()
  return x if active is None else jax.lax.with_sharding_constraint(x, _spec(names, active[1]))


def shard_map_op(fn: Callable[..., Any], in_names: Sequence[Sequence[str | None] | None],
                 out_names: Any) -> Callable[..., Any]:
  """``fn`` run on each device's block of its arguments, split by logical names.

  For an op that may run a Pallas kernel, which must see whole arrays: under
  an active mesh and rules (``gemkit.sharding.activate``) argument ``i`` is
  split over the mesh axes its logical ``in_names[i]`` map to (e.g.
  ``("batch", None, "heads", None)`` for [B, T, H, D] splits B over data x fsdp
  and H over tensor), ``fn`` runs per shard under ``jax.shard_map``, and its
  outputs are reassembled by ``out_names`` (a tuple of names per output, in
  ``fn``'s output structure). A name of None (or one without a rule) keeps
  that dim whole; an argument that is None reaches ``fn`` as None. ``fn`` must
  be independent along every split dim (batch rows, heads, channels):
  per-shard calls then equal the unsharded one, and no input is gathered.

  Without a mesh, or when a split dim does not divide into its shards (a
  decode batch of 1 on a data-parallel mesh), this is ``fn`` itself and the
  SPMD partitioner places it.
  """
  def wrapped(*args):
    active = _mesh_and_rules()
    if active is None:
      return fn(*args)
    mesh, rules = active
    if len(args) != len(in_names):
      raise ValueError(f"in_names has {len(in_names)} entries, got {len(args)} arguments")
    present = [i for i, x in enumerate(args) if x is not None]
    in_specs = tuple(_spec(in_names[i], rules) for i in present)
    for i, spec in zip(present, in_specs):
      if any(size % _shards(mesh, entry) for size, entry in zip(args[i].shape, spec)):
        return fn(*args)
    is_names = lambda n: n is None or (isinstance(n, tuple) and all(
        a is None or isinstance(a, str) for a in n))
    out_specs = jax.tree.map(lambda n: _spec(n, rules), out_names, is_leaf=is_names)

    def local(*blocks):
      full = [None] * len(args)
      for i, block in zip(present, blocks):
        full[i] = block
      return fn(*full)

    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        *(args[i] for i in present))

  return wrapped


def kernel_op(fn: Callable[..., Any], impl: str,
              in_names: Sequence[Sequence[str | None] | None], out_names: Any
              ) -> Callable[..., Any]:
  """``shard_map_op(fn, ...)`` when ``impl`` may resolve to a Pallas kernel on
  this backend (``ops.common.may_use_kernel``), else ``fn``: XLA ops are left
  to the SPMD partitioner."""
  return shard_map_op(fn, in_names, out_names) if common.may_use_kernel(impl) else fn


def mesh_axes(name: str | None) -> tuple[str, ...]:
  """The mesh axes the active rules map logical axis ``name`` to (() without a mesh)."""
  active = _mesh_and_rules()
  axes = None if active is None or name is None else _spec((name,), active[1])[0]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def mesh_shards(name: str) -> int:
  """How many shards the active mesh and rules split logical axis ``name`` into."""
  active = _mesh_and_rules()
  return 1 if active is None else _shards(active[0], _spec((name,), active[1])[0])


class QuantizedKernel(nnx.Variable):
  """One storage array of a quantized :class:`Dense` weight (codes, scales, ...).

  Not an ``nnx.Param``: ``nnx.split(model, nnx.Param, ...)`` puts it with the
  frozen state, so the optimizer never updates it and ``gemkit.train`` keeps it
  in ``TrainState.frozen``. It checkpoints like any array (int8 codes, float32
  scales, float8_e4m3fn values round-trip through orbax as they are) and
  carries logical axis names for sharding.
  """


_QUANT_FIELDS = ("values", "scales", "zeros", "scale_scales", "scale_offset")


class Dense(nnx.Module):
  """y = x @ W (+ b), W: [in, out], computed in ``dtype`` (params stay ``param_dtype``).

  After :meth:`quantize`, W is held as an ``ops.quant.QuantizedWeight``:
  ``kernel`` is None, ``quantized`` holds its arrays (:class:`QuantizedKernel`)
  and ``y = quant.quantized_matmul(x, W, act_fmt=..., outlier_threshold=...,
  impl=...)``, with those three settable per layer as attributes. The
  gradient reaches x (through the dequantized W), never W: a frozen quantized
  base can be trained through (QLoRA).
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               names: tuple[str | None, str | None] = (None, None),
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init: Initializer | None = None):
    init = kernel_init or nnx.initializers.normal(in_features ** -0.5)
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, init, (in_features, out_features), param_dtype, names)
    self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), param_dtype,
                       names[1:]) if use_bias else None)
    self.quantized: nnx.Dict | None = None

  @property
  def is_quantized(self) -> bool:
    return self.quantized is not None

  def quantize(self, fmt: str, *, group_size: int | None = None, symmetric: bool = True,
               double_quant: bool = False, act_fmt: str | None = None,
               outlier_threshold: float | None = None, impl: str = "auto") -> None:
    """Replaces the float kernel by ``quant.quantize(kernel, fmt, ...)``, in place.

    ``fmt``, ``group_size``, ``symmetric``, ``double_quant``: as
    ``ops.quant.quantize`` (grouped along ``in``). ``act_fmt``,
    ``outlier_threshold``, ``impl``: as ``ops.quant.quantized_matmul``; they are
    checked against the weight here, so a bad combination fails before any
    state changes.
    """
    if self.quantized is not None:
      raise ValueError(f"this Dense is already quantized ({self.quant_layout[0]})")
    qw = quant.quantize(self.kernel[...], fmt, group_size=group_size, symmetric=symmetric,
                        double_quant=double_quant)
    jax.eval_shape(lambda x: quant.quantized_matmul(
        x, qw, act_fmt=act_fmt, outlier_threshold=outlier_threshold, impl=impl),
                   jax.ShapeDtypeStruct((1, self.in_features), self.dtype))
    k_name, n_name = self.kernel.get_metadata().get("out_sharding") or (None, None)
    arrays = {}
    for field in _QUANT_FIELDS:
      a = getattr(qw, field)
      if a is None:
        continue
      # values [K or packed K, N] split like the kernel; per-group arrays [K/G, N] by N only.
      spec = ((k_name if field == "values" else None,
               n_name if a.shape[1] == self.out_features else None) if a.ndim == 2
              else (None,) * a.ndim)
      arrays[field] = QuantizedKernel(a, out_sharding=spec, eager_sharding=False)
    self.kernel = None
    self.quantized = nnx.data(nnx.Dict(arrays))
    self.quant_layout = (qw.fmt, qw.shape, qw.group_size, qw.axis)
    self.act_fmt, self.outlier_threshold, self.impl = act_fmt, outlier_threshold, impl

  def quantized_weight(self) -> quant.QuantizedWeight:
    """The ``QuantizedWeight`` [in, out] of a quantized layer."""
    return self._weight_of(*(self.quantized[f][...] for f in self.quantized))

  def _weight_of(self, *arrays: jax.Array) -> quant.QuantizedWeight:
    """A QuantizedWeight of this layer's layout from its arrays (or a block of
    their output columns: the shape follows ``values``)."""
    fmt, shape, group_size, axis = self.quant_layout
    fields = dict(zip(self.quantized, arrays))
    return quant.QuantizedWeight(**fields, fmt=fmt, shape=(shape[0], fields["values"].shape[1]),
                                 group_size=group_size, axis=axis)

  def _quantized_matmul(self, x: jax.Array, *arrays: jax.Array) -> jax.Array:
    return quant.quantized_matmul(x, self._weight_of(*arrays), act_fmt=self.act_fmt,
                                  outlier_threshold=self.outlier_threshold, impl=self.impl)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if self.quantized is None:
      y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    else:
      arrays = tuple(self.quantized[f][...] for f in self.quantized)
      # Per shard: rows of x, and output columns where the weight is split by
      # them over other mesh axes than the rows (not with double
      # quantization, whose scale blocks run across columns); the kernel
      # reads the packed weight, whole along K.
      n_name = (self.quantized["values"].get_metadata().get("out_sharding") or (None,) * 2)[1]
      if "scale_scales" in self.quantized or set(mesh_axes(n_name)) & set(mesh_axes("batch")):
        n_name = None
      w_names = [(None, n_name) if a.ndim == 2 and a.shape[1] == self.out_features
                 else None for a in arrays]
      rows = ("batch",) + (None,) * (x.ndim - 1)
      y = kernel_op(self._quantized_matmul, self.impl, [rows] + w_names,
                    rows[:-1] + (n_name,))(x, *arrays)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding E [vocab, d] ~ N(0, 1/d).

  ``__call__`` returns c * E[ids] with c = ``scale`` (default sqrt(d): unit-scale
  inputs, as Gemma; Llama-style checkpoints use 1) and ``attend`` the tied
  logits x @ E^T (unit-scale at initialisation). c is applied in ``dtype``,
  as Gemma does (a bf16 model multiplies by bf16(sqrt(d))).
  """

  def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, scale: float | None = None):
    self.dtype = dtype
    self.scale = features ** 0.5 if scale is None else float(scale)
    self.embedding = param(rngs, nnx.initializers.normal(features ** -0.5),
                           (vocab_size, features), param_dtype, ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
    return x if self.scale == 1.0 else x * jnp.asarray(self.scale, self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * (offset + scale), statistics in float32.

  ``offset`` 0 (Llama) or 1 (Gemma, whose weight w multiplies as 1 + w and
  starts at 0). ``names`` tags ``scale`` (``("embed",)``; ``(None,)`` for a
  per-head norm over head_dim). Written out (not ``nnx.RMSNorm``) to keep the
  float32 statistics under bf16 compute and to carry the logical axis name.
  """

  def __init__(self, features: int, *, eps: float = 1e-6, offset: float = 0.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
               names: tuple[str | None] = ("embed",)):
    self.eps, self.offset, self.dtype = eps, float(offset), dtype
    init = nnx.initializers.zeros if offset == 1.0 else nnx.initializers.ones
    self.scale = param(rngs, init, (features,), param_dtype, names)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class FieldError(ValueError):
  """A model-config field holds a value that cannot work: ``field`` names it,
  ``message`` says what it must be (``str``: "<field> <message>")."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field} {message}")
    self.field, self.message = field, message


def config_from(cls, model_cfg: Mapping[str, Any], family: str):
  """``cls(**model_cfg)`` for a model-config dataclass, without the ``family`` and
  ``init_from`` keys (the latter names the run's initial weights, which
  ``gemkit.hf`` reads); keys that are not fields of ``cls`` are a ValueError
  naming ``family``."""
  values = dict(model_cfg)
  values.pop("family", None)
  values.pop("init_from", None)
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"unknown {family} config keys: {unknown}")
  return cls(**values)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """c tanh(x / c) for a cap c > 0 (Gemma 2, Griffin); x itself for c = 0."""
  return cap * jnp.tanh(x / cap) if cap > 0 else x


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(rotary_dim: int, theta: float = 10_000.0, rope_type: str = "default", *,
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_max_len: int = 8192) -> np.ndarray:
  """Inverse frequencies f_i = theta^(-2i / rotary_dim), i < rotary_dim / 2, float32.

  ``rope_type``:
    default  f_i as is (Su et al. 2021).
    linear   f_i / factor (position interpolation, Chen et al. 2023).
    llama3   Llama 3.1's scaling: with wavelength l_i = 2 pi / f_i, L the
             ``original_max_len``, l_i > L / low_freq_factor -> f_i / factor;
             l_i < L / high_freq_factor -> f_i; in between the smooth blend
             (1 - s) f_i / factor + s f_i, s = (L / l_i - low) / (high - low).
  """
  if rope_type not in ROPE_TYPES:
    raise FieldError("rope_type", f"must be one of {ROPE_TYPES}, got {rope_type!r}")
  exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
  freq = (1.0 / np.float32(theta) ** exponent).astype(np.float32)
  if rope_type == "linear":
    freq = freq / np.float32(factor)
  elif rope_type == "llama3":
    wavelen = 2 * np.pi / freq
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = np.where(wavelen > original_max_len / low_freq_factor, freq / factor, freq)
    medium = ((wavelen >= original_max_len / high_freq_factor)
              & (wavelen <= original_max_len / low_freq_factor))
    freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return np.asarray(freq, np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0, *,
               inv_freq: np.ndarray | None = None) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half form.

  With R = 2 len(f) rotated dims (the first R of D; the rest pass through)
  and angle p * f_i, for pairs (x_i, x_{i + R/2}):
    (x_i, x_{i+R/2}) -> (x_i cos - x_{i+R/2} sin, x_{i+R/2} cos + x_i sin).

  Args:
    x: [B, T, H, D] with D even.
    positions: [B, T] integer positions.
    theta: the base of the default frequencies ``rope_frequencies(D, theta)``.
    inv_freq: [R / 2] frequencies instead (scaled RoPE, partial rotation).
  """
  freq = rope_frequencies(x.shape[-1], theta) if inv_freq is None else inv_freq
  rot = 2 * len(freq)
  angle = positions[..., None, None].astype(jnp.float32) * jnp.asarray(freq)  # [B, T, 1, R/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :rot // 2], x32[..., rot // 2:rot]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x32[..., rot:]], axis=-1)
  return out.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token within its segment: [B, T] -> [B, T] (0 at each start)."""
  T = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(T), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], bool),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,                                          # SwiGLU (Llama, Qwen)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GeGLU (Gemma, Griffin)
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The gated MLP's activation by name (``ACTIVATIONS``)."""
  if name not in ACTIVATIONS:
    raise FieldError("mlp_activation", f"must be one of {sorted(ACTIVATIONS)}, got {name!r}")
  return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
  """Gated MLP (Shazeer 2020): down(act(x W_gate) * (x W_up)); SwiGLU with silu."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
               dtype=jnp.float32, param_dtype=jnp.float32, use_bias: bool = False):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
    self.activation = activation
    self.gate_proj = Dense(d_model, hidden, names=("embed", "mlp"), **kw)
    self.up_proj = Dense(d_model, hidden, names=("embed", "mlp"), **kw)
    self.down_proj = Dense(hidden, d_model, names=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = fused_dense(x, self.gate_proj, self.up_proj)
    h = self.activation(gate) * up
    return self.down_proj(constrain(h, ("batch", "seq", "mlp")))


def fused_dense(x: jax.Array, *denses) -> tuple[jax.Array, ...]:
  """``tuple(d(x) for d in denses)`` as one matmul when all are float :class:`Dense`
  layers of one dtype: kernels of one shape stacked [in, n, out] (a device's block
  of ``out`` holds its columns of every one, so sharded outputs stay in place),
  kernels of different widths concatenated [in, sum out] when no mesh axis splits
  their outputs; one matmul each otherwise (quantized or adapted layers). One wide
  matmul reads x once and gives one weight gradient instead of n narrow ones."""
  if not all(type(d) is Dense and not d.is_quantized and d.dtype == denses[0].dtype
             for d in denses):
    return tuple(d(x) for d in denses)
  dtype = denses[0].dtype
  x = x.astype(dtype)
  kernels = [d.kernel[...].astype(dtype) for d in denses]
  if len({k.shape for k in kernels}) == 1:
    y = jnp.einsum("...i,ikj->...kj", x, jnp.stack(kernels, axis=1))
    ys = [part[..., 0, :] for part in jnp.split(y, len(denses), axis=-2)]  # grad: a concat
  elif all(mesh_shards(d.kernel.get_metadata().get("out_sharding", (None, None))[1]) == 1
           for d in denses):
    y = jnp.dot(x, jnp.concatenate(kernels, axis=1))
    ys = jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1].tolist(), axis=-1)
  else:
    return tuple(d(x) for d in denses)
  return tuple(y if d.bias is None else y + d.bias[...].astype(dtype)
               for y, d in zip(ys, denses))
