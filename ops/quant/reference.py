"""Weight formats of ``ops.quant`` and the XLA path of ``quantized_matmul``.

This module is the specification: pure ``jnp``, no validation (``api`` does
that). The Pallas kernels reuse its element decoders (``bit_planes``,
``decode``), so a tile is dequantized there exactly as here.

Notation. A weight ``w`` has shape ``[K, N]`` (``[in, out]``). It is
quantized in groups of ``G = group_size`` consecutive elements along
``axis`` (default 0, the input/contraction axis); each group of each
column has one scale ``s`` (and, for asymmetric int4, one zero point
``z``). With ``axis=1`` the same is done to ``w.T`` and the storage is kept
transposed. Below, ``K`` is the length of the grouped axis, ``N`` the other.

Formats (``w_hat`` is the dequantized weight, ``q`` the stored code):

====================  ======================================  ==================================
fmt                   quantize                                storage
====================  ======================================  ==================================
``int8``              s = max|w|/127, q = round(w/s)           int8 [K, N]; f32 s [K/G, N]
                      (G = K, per channel, by default)
``int4`` symmetric    s = max|w|/7, q = round(w/s) + 8 in      int8 [K/2, N] (2 codes per byte,
                      [1, 15]; w_hat = (q - 8) s                see "Packing"); f32 s [K/G, N]
``int4`` asymmetric   lo = min(w, 0), hi = max(w, 0),          as symmetric, plus int8 zero
                      s = (hi - lo)/15, z = round(-lo/s),      points z [K/G, N]
                      q = clip(round(w/s) + z, 0, 15);
                      w_hat = (q - z) s   (G = 128 default)
``nf4`` / ``fp4``     s = max|w| (absmax per block of G = 64), int8 [K/2, N]; f32 s [K/G, N]
                      q = nearest entry of a 16-entry table
                      T to w/s; w_hat = T[q] s
``fp8``               s = max|w|/448, q = e4m3(w/s)            float8_e4m3fn [K, N]; f32 s [K/G, N]
``ternary``           s = mean|w| (absmean, per tensor by      int8 [ceil(K/4), N] (4 codes per
                      default), q = clip(round(w/s), -1, 1),    byte); f32 s [1, 1] or [K/G, N]
                      w_hat = q s
====================  ======================================  ==================================

A zero group (s = 0) stores s = 1 instead, so it dequantizes to exact zeros.

Tables. NF4 is QLoRA's NormalFloat4 (Dettmers et al., 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", Appendix E): quantiles of N(0, 1)
normalized to [-1, 1], with an exact zero. FP4 is the OCP e2m1 format
(sign, 2 exponent bits with bias 1, 1 mantissa bit: magnitudes 0, 0.5, 1,
1.5, 2, 3, 4, 6), code = its bit pattern, divided by 6 so that it spans
[-1, 1] like NF4 and both share the absmax scale.

Double quantization (QLoRA §3, nf4/fp4 only). The absmax scales ``c``
[K/G, N] are re-quantized: ``mu = mean(c)``; the flattened ``c - mu`` is
split into blocks of 256 with ``s2 = max|c - mu| / 127`` per block and
stored as int8. This saves ~0.37 bit per weight at G = 64. Deviation:
QLoRA stores the second level as 8-bit floats (bitsandbytes' dynamic map);
here it is linear int8.

Packing. Sub-byte codes are stored ``8 / bits`` to a byte, in "planes":
within each unit of ``U`` consecutive rows, bit field ``p`` (least
significant first) of byte row ``r`` holds row ``p * U / P + r`` of the
unit, ``P = 8 / bits``. int4/nf4/fp4 use ``bits = 4`` and ``U = G`` (a
group's first half in the low nibbles, its second half in the high
nibbles), so a kernel tile that covers whole groups unpacks with two
shifts and no interleave. Ternary uses ``bits = 2`` over the whole K axis
(``U = K`` rounded up to a multiple of 4, padding with zero codes).

Activation quantization (``act_fmt``), per token (row of ``x``):

- ``"int8"`` (W8A8): ``sx = max|x|/127``, ``xq = round(x/sx)``;
  ``y = (xq @ wq) * sx * sw`` with int32 accumulation, where ``wq`` are the
  integer weight values (int8 codes, int4 ``q - 8`` or ``q - z``, ternary
  ``q``) and ``sw`` the per-channel (or per-tensor) weight scale.
- ``"fp8"``: ``sx = max|x|/448``, ``xq = e4m3(x/sx)``,
  ``y = (xq @ wq) * sx * sw`` with float32 accumulation (fp8 weights).
- LLM.int8() (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix
  Multiplication for Transformers at Scale"): the feature columns ``k`` of
  ``x`` where any ``|x[:, k]| >= threshold`` go through a float matmul with
  the dequantized rows of W, the rest through W8A8, and the two are summed.
  Under ``jit`` the outlier set is a mask, so the float part here is a
  dense matmul of the masked ``x``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "nf4", "fp4", "fp8", "ternary")
ACT_FORMATS = (None, "int8", "fp8")
PACKED_FORMATS = ("int4", "nf4", "fp4")
DEFAULT_GROUP_SIZE = {"int4": 128, "nf4": 64, "fp4": 64}
DOUBLE_QUANT_BLOCK = 256

# QLoRA NormalFloat4, ascending (index = code).
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367,
             -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
             -0.09105003625154495, 0.0, 0.07958029955625534,
             0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# e2m1 by bit pattern (code 8 is -0), normalized to [-1, 1].
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_TABLE = tuple(v / 6.0 for v in _E2M1) + tuple(-v / 6.0 for v in _E2M1)
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}
_QMAX = {"int8": 127.0, "fp8": 448.0}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedWeight:
  """A quantized ``[K, N]`` weight: a pytree of storage arrays + static metadata.

  Array leaves (children): ``values`` (codes, see the module docstring for
  each format's layout), ``scales``, and, when used, ``zeros`` (asymmetric
  int4), ``scale_scales`` and ``scale_offset`` (double quantization; then
  ``scales`` holds int8 codes). Static aux data: ``fmt``, ``shape`` (the
  logical float shape), ``group_size`` (``None`` = one scale per tensor)
  and ``axis`` (the grouped axis). ``jit``, ``vmap`` (e.g. a stack of
  layers' weights) and sharding see only the arrays.
  """
  values: jax.Array
  scales: jax.Array
  zeros: jax.Array | None = None
  scale_scales: jax.Array | None = None
  scale_offset: jax.Array | None = None
  fmt: str = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(metadata=dict(static=True))
  axis: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    """Bytes of real storage: every array leaf, packed as stored."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(self))

  @property
  def symmetric(self) -> bool:
    return self.zeros is None

  @property
  def double_quant(self) -> bool:
    return self.scale_scales is not None


# --------------------------------------------------------------------------
# Element codecs, shared with the kernels (int32 arithmetic, no gathers).
# --------------------------------------------------------------------------

def bit_planes(packed: jax.Array, bits: int) -> list[jax.Array]:
  """The ``8 // bits`` code planes (int32) of an int8 array, LSB field first."""
  b = packed.astype(jnp.int32)  # widen before shifting (TPU: no i8 shifts)
  mask = (1 << bits) - 1
  return [(b >> (bits * p)) & mask for p in range(8 // bits)]


def lut16(codes: jax.Array, table) -> jax.Array:
  """``table[codes]`` (float32) as a tree of 15 selects on the code bits.

  Equivalent to a gather from the 16 constants; written with ``where`` so
  that it runs inside Pallas TPU and Triton kernels, which have no gather.
  """
  vals = [float(v) for v in table]
  for bit in range(4):
    on = ((codes >> bit) & 1) == 1
    vals = [jnp.where(on, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
  return jnp.asarray(vals[0], jnp.float32)


def decode(codes: jax.Array, fmt: str, symmetric: bool = True) -> jax.Array:
  """Stored codes -> float32 values before scaling (zero point not applied)."""
  if fmt in TABLES:
    return lut16(codes, TABLES[fmt])
  codes = codes.astype(jnp.float32)
  if fmt == "int4" and symmetric:
    return codes - 8.0
  if fmt == "ternary":
    return codes - 1.0
  return codes  # int8, fp8, asymmetric int4


def pack_planes(codes: jax.Array, bits: int, unit: int) -> jax.Array:
  """int32 codes [R, N] in [0, 2**bits) -> int8 [R * bits / 8, N] (planes layout)."""
  per = 8 // bits
  rows, n = codes.shape
  c = codes.reshape(rows // unit, per, unit // per, n)
  byte = sum(c[:, p] << (bits * p) for p in range(per))  # 0..255
  byte = jnp.where(byte >= 128, byte - 256, byte)          # two's complement
  return byte.reshape(rows // per, n).astype(jnp.int8)


def unpack_planes(packed: jax.Array, bits: int, unit: int) -> jax.Array:
  """Inverse of ``pack_planes``: int8 [R * bits / 8, N] -> int32 codes [R, N]."""
  per = 8 // bits
  rows, n = packed.shape
  planes = [p.reshape(rows * per // unit, unit // per, n) for p in bit_planes(packed, bits)]
  return jnp.stack(planes, axis=1).reshape(rows * per, n)


# --------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------

def _safe(s: jax.Array) -> jax.Array:
  return jnp.where(s > 0, s, 1.0)


def _nearest_code(v: jax.Array, table) -> jax.Array:
  """The code of the table entry nearest to each ``v`` (int32)."""
  table = np.asarray(table, np.float32)
  order = np.argsort(table, kind="stable")
  ordered = table[order]
  mids = jnp.asarray((ordered[1:] + ordered[:-1]) / 2)
  return jnp.asarray(order, jnp.int32)[jnp.searchsorted(mids, v)]


def _double_quantize(c: jax.Array):
  """Second-level int8 quantization of absmax scales c [K/G, N] (QLoRA)."""
  mu = jnp.mean(c)
  d = (c - mu).reshape(-1)
  d = jnp.pad(d, (0, -d.size % DOUBLE_QUANT_BLOCK)).reshape(-1, DOUBLE_QUANT_BLOCK)
  s2 = _safe(jnp.max(jnp.abs(d), axis=1) / 127.0)
  q = jnp.clip(jnp.round(d / s2[:, None]), -127, 127).astype(jnp.int8)
  return q.reshape(-1)[:c.size].reshape(c.shape), s2, mu


def quantize(w: jax.Array, fmt: str, *, group_size: int | None = None,
             axis: int = 0, symmetric: bool = True,
             double_quant: bool = False) -> QuantizedWeight:
  """Quantizes ``w`` [K, N] (inputs already validated; see module docstring).

  ``group_size=None`` means: per-tensor for ternary, per-channel for int8 and
  fp8, the format default otherwise (``api`` resolves the defaults).
  """
  shape = tuple(w.shape)
  wk = (w if axis == 0 else w.T).astype(jnp.float32)
  k, n = wk.shape
  per_tensor = group_size is None
  g = k if per_tensor else group_size
  groups = wk.reshape(k // g, g, n)
  red = (0, 1, 2) if per_tensor else 1
  zeros = scale_scales = scale_offset = None

  if fmt in ("int8", "fp8"):
    s = _safe(jnp.max(jnp.abs(groups), axis=red, keepdims=True) / _QMAX[fmt])
    if fmt == "int8":
      values = jnp.clip(jnp.round(groups / s), -127, 127).astype(jnp.int8)
    else:
      values = jnp.clip(groups / s, -448.0, 448.0).astype(jnp.float8_e4m3fn)
    values = values.reshape(k, n)
  elif fmt == "int4":
    if symmetric:
      s = _safe(jnp.max(jnp.abs(groups), axis=red, keepdims=True) / 7.0)
      codes = jnp.clip(jnp.round(groups / s), -7, 7) + 8
    else:
      lo = jnp.minimum(jnp.min(groups, axis=red, keepdims=True), 0.0)
      hi = jnp.maximum(jnp.max(groups, axis=red, keepdims=True), 0.0)
      s = _safe((hi - lo) / 15.0)
      z = jnp.clip(jnp.round(-lo / s), 0, 15)
      codes = jnp.clip(jnp.round(groups / s) + z, 0, 15)
      zeros = z.reshape(s.shape[0], -1).astype(jnp.int8)
    values = pack_planes(codes.astype(jnp.int32).reshape(k, n), 4, g)
  elif fmt in TABLES:
    s = _safe(jnp.max(jnp.abs(groups), axis=red, keepdims=True))
    codes = _nearest_code(groups / s, TABLES[fmt])
    values = pack_planes(codes.reshape(k, n), 4, g)
  elif fmt == "ternary":
    s = _safe(jnp.mean(jnp.abs(groups), axis=red, keepdims=True))
    codes = (jnp.clip(jnp.round(groups / s), -1, 1) + 1).astype(jnp.int32).reshape(k, n)
    kp = -(-k // 4) * 4
    codes = jnp.pad(codes, ((0, kp - k), (0, 0)), constant_values=1)
    values = pack_planes(codes, 2, kp)
  else:
    raise ValueError(f"unknown fmt {fmt!r}")

  scales = s.reshape(s.shape[0], -1)
  if double_quant:
    scales, scale_scales, scale_offset = _double_quantize(scales)
  return QuantizedWeight(values=values, scales=scales, zeros=zeros,
                         scale_scales=scale_scales, scale_offset=scale_offset,
                         fmt=fmt, shape=shape, group_size=group_size, axis=axis)


def decoded_scales(qw: QuantizedWeight) -> jax.Array:
  """The float32 scales [K/G, N] ([1, 1] per tensor), undoing double quant."""
  if not qw.double_quant:
    return qw.scales.astype(jnp.float32)
  q = qw.scales.reshape(-1).astype(jnp.float32)
  q = jnp.pad(q, (0, -q.size % DOUBLE_QUANT_BLOCK)).reshape(-1, DOUBLE_QUANT_BLOCK)
  c = (q * qw.scale_scales[:, None]).reshape(-1)[:qw.scales.size]
  return c.reshape(qw.scales.shape) + qw.scale_offset


def grouped_k(qw: QuantizedWeight) -> int:
  """Length of the grouped axis."""
  return qw.shape[qw.axis]


def codes(qw: QuantizedWeight) -> jax.Array:
  """The unpacked codes [K, N] in storage orientation (int32; fp8 as float32)."""
  k = grouped_k(qw)
  if qw.fmt in PACKED_FORMATS:
    return unpack_planes(qw.values, 4, qw.group_size or k)
  if qw.fmt == "ternary":
    return unpack_planes(qw.values, 2, qw.values.shape[0] * 4)[:k]
  if qw.fmt == "fp8":
    return qw.values.astype(jnp.float32)
  return qw.values.astype(jnp.int32)


def _per_group(qw: QuantizedWeight, a: jax.Array) -> jax.Array:
  """Broadcasts a per-group array [K/G, N] (or [1, 1]) to [K/G, 1, N]."""
  return a.reshape(a.shape[0], 1, a.shape[1])


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """``w_hat`` with the logical shape ``qw.shape``."""
  k = grouped_k(qw)
  v = decode(codes(qw), qw.fmt, qw.symmetric)
  ng = qw.scales.shape[0]
  v = v.reshape(ng, k // ng, -1)
  if qw.zeros is not None:
    v = v - _per_group(qw, qw.zeros.astype(jnp.float32))
  w = (v * _per_group(qw, decoded_scales(qw))).reshape(k, -1)
  return (w if qw.axis == 0 else w.T).astype(dtype)


# --------------------------------------------------------------------------
# The XLA path of quantized_matmul
# --------------------------------------------------------------------------

def integer_weight(qw: QuantizedWeight) -> tuple[jax.Array, jax.Array]:
  """(int8 values [K, N], per-channel scales [N] or [1]) for W8A8.

  Needs an integer format with one scale per output channel or tensor.
  """
  q = decode(codes(qw), qw.fmt, qw.symmetric)
  if qw.zeros is not None:
    q = q - qw.zeros.astype(jnp.float32)
  return q.astype(jnp.int8), decoded_scales(qw)[0]


def quantize_activations(x: jax.Array, act_fmt: str) -> tuple[jax.Array, jax.Array]:
  """Dynamic per-token quantization: (xq [M, K], sx [M, 1] float32)."""
  x = x.astype(jnp.float32)
  sx = _safe(jnp.max(jnp.abs(x), axis=-1, keepdims=True) / _QMAX[act_fmt])
  if act_fmt == "int8":
    return jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8), sx
  return jnp.clip(x / sx, -448.0, 448.0).astype(jnp.float8_e4m3fn), sx


def outlier_mask(x: jax.Array, threshold: float) -> jax.Array:
  """LLM.int8() outlier features: [K] bool, any |x[:, k]| >= threshold."""
  return jnp.any(jnp.abs(x) >= threshold, axis=0)


def weight_only_matmul(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """``x @ dequantize(qw)`` with float32 accumulation, in x's dtype."""
  w = dequantize(qw, jnp.float32).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def act_quant_matmul(x: jax.Array, qw: QuantizedWeight, act_fmt: str) -> jax.Array:
  """W8A8 (int32 accumulation) or FP8 x FP8 (float32 accumulation), float32."""
  xq, sx = quantize_activations(x, act_fmt)
  if act_fmt == "int8":
    wq, sw = integer_weight(qw)
    acc = jnp.dot(xq, wq, preferred_element_type=jnp.int32).astype(jnp.float32)
  else:
    sw = decoded_scales(qw)[0]
    acc = jnp.dot(xq, qw.values, preferred_element_type=jnp.float32)
  return acc * sx * sw


def matmul(x: jax.Array, qw: QuantizedWeight, act_fmt: str | None = None,
           outlier_threshold: float | None = None) -> jax.Array:
  """The XLA path: x [M, K] -> [M, N] in x's dtype (inputs validated)."""
  if act_fmt is None:
    y = weight_only_matmul(x, qw)
  elif outlier_threshold is None:
    y = act_quant_matmul(x, qw, act_fmt)
  else:
    mask = outlier_mask(x, outlier_threshold)
    y = (weight_only_matmul(jnp.where(mask, x, 0), qw)
         + act_quant_matmul(jnp.where(mask, 0, x), qw, act_fmt))
  return y.astype(x.dtype)


def weight_only_matmul_t(g: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """``g @ dequantize(qw).T`` (the gradient with respect to x), float32."""
  w = dequantize(qw, jnp.float32).astype(g.dtype)
  return jnp.dot(g, w.T, preferred_element_type=jnp.float32)


def zero_cotangent(tree: Any) -> Any:
  """Zero cotangents: float0 for integer leaves, zeros for float leaves."""
  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)
  return jax.tree_util.tree_map(zero, tree)
