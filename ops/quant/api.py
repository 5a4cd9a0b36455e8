"""Public API of ``ops.quant``: validation, ``impl`` dispatch, ``custom_vjp``, BlockSizes.

Formats and math: ``reference`` (the specification and the XLA path).
Kernels: ``tpu`` (Pallas Mosaic) and ``gpu`` (Pallas Triton), for int8,
int4, nf4 and fp4 weight-only and W8A8 int8 with per-channel int8 weights;
every other combination runs on XLA.

Gradients. ``quantized_matmul`` is a ``jax.custom_vjp``: the cotangent of
``x`` is ``g @ dequantize(qw).T`` (computed by the same kernel family,
transposed, when a kernel ran the forward). With ``act_fmt`` the rounding
of the activations is treated as the identity (straight-through
estimator). The weight gets no gradient: integer leaves get ``float0``
cotangents and float leaves (scales, fp8 values) get zeros, so a frozen
quantized base can be trained through (QLoRA). To learn scales, call
``dequantize`` under autodiff instead.

jit and vmap work through every public function and ``impl`` (vmapping a
kernel adds a grid axis). One exception from jax 0.10.2 itself: a vmapped
TPU kernel cannot run in TPU *interpret* mode (its batching rule leaves
``dimension_semantics`` one entry short); it lowers for a real TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ops import config
from ops.common import check_float, check_rank, device_kind, select_impl
from ops.quant import gpu, reference, tpu
from ops.quant.reference import (ACT_FORMATS, DEFAULT_GROUP_SIZE, FORMATS, PACKED_FORMATS,
                                 QuantizedWeight)

_KERNELS = {"pallas_tpu": tpu, "pallas_gpu": gpu}
_TARGET = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
_INT_FORMATS = ("int8", "int4", "ternary")  # integer weight values: usable by W8A8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the quantized-matmul kernels.

  TPU (``tpu.py``): grid ``(M/block_m, N/block_n, K/block_k)``. GPU
  (``gpu.py``): grid ``(M/block_m, N/block_n)``, K walked in steps of
  ``block_k`` inside the kernel. The backward (``g @ W^T``) uses the same
  sizes with the roles of N and K swapped in the grid. The rules are
  ``tpu.block_sizes_error`` / ``gpu.block_sizes_error``.
  """
  block_m: int
  block_n: int
  block_k: int

  @classmethod
  def get_default(cls, shape: tuple[int, int, int], dtype, device_kind: str, *,
                  kernel: str = "pallas_tpu", fmt: str = "int8",
                  group_size: int | None = None) -> "BlockSizes":
    """Defaults for an ``[M, K] x [K, N]`` problem, ``shape = (M, K, N)``.

    ``dtype`` is the kernel's x dtype (int8 for W8A8); ``group_size=None``
    means per channel. The tuned table of ``device_kind`` wins, else a
    heuristic; the result may still fail ``validate`` for shapes that do not
    tile (then ``impl="auto"`` falls back to XLA).
    """
    m, k, n = shape
    backend = _KERNELS[kernel]
    kw = dict(group_size=group_size or k, packed=fmt in PACKED_FORMATS, x_dtype=dtype)
    tuned = backend.TUNED_BLOCK_SIZES.get(device_kind)
    if tuned and backend.block_sizes_error(*tuned, m=m, k=k, n=n, **kw) is None:
      return cls(*tuned)
    return cls(*backend.default_block_sizes(m, k, n, **kw))

  def validate(self, shape: tuple[int, int, int], dtype, *, kernel: str,
               fmt: str, group_size: int | None) -> None:
    """ValueError unless these sizes tile ``shape = (M, K, N)`` on ``kernel``."""
    err = self.error(shape, dtype, kernel=kernel, fmt=fmt, group_size=group_size)
    if err:
      raise ValueError(f"BlockSizes for {kernel}: {err}")

  def error(self, shape, dtype, *, kernel: str, fmt: str, group_size: int | None) -> str | None:
    m, k, n = shape
    return _KERNELS[kernel].block_sizes_error(
        self.block_m, self.block_n, self.block_k, m=m, k=k, n=n,
        group_size=group_size or k, packed=fmt in PACKED_FORMATS, x_dtype=dtype)

  def astuple(self) -> tuple[int, int, int]:
    return self.block_m, self.block_n, self.block_k


# --------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "axis", "symmetric", "double_quant"))
def _quantize(w, *, fmt, group_size, axis, symmetric, double_quant):
  return reference.quantize(w, fmt, group_size=group_size, axis=axis,
                            symmetric=symmetric, double_quant=double_quant)


def quantize(w: jax.Array, fmt: str, *, group_size: int | None = None, axis: int = 0,
             symmetric: bool = True, double_quant: bool = False) -> QuantizedWeight:
  """Quantizes a weight ``w`` [K, N] to ``fmt`` (formats: ``reference``).

  Args:
    w: float32 / bfloat16 / float16 [K, N] (``[in, out]``).
    fmt: one of ``"int8", "int4", "nf4", "fp4", "fp8", "ternary"``.
    group_size: elements along ``axis`` that share one scale. ``None``: per
      channel for int8 and fp8, 128 for int4, 64 for nf4/fp4, per tensor
      for ternary (``group_size=K`` gives per-channel ternary). Must divide
      ``w.shape[axis]``; even for the 4-bit formats.
    axis: the grouped axis of ``w`` (0: along K, the default; kernels need 0).
    symmetric: int4 only; ``False`` adds an integer zero point per group.
    double_quant: nf4/fp4 only; quantize the absmax scales again (QLoRA).

  Returns:
    A ``QuantizedWeight`` pytree; ``dequantize`` inverts it.
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  w = jnp.asarray(w)
  check_rank("w", w, 2, "[K, N]")
  check_float("w", w)
  if axis not in (0, 1, -1, -2):
    raise ValueError(f"axis must be 0 or 1 for a 2-D weight, got {axis!r}")
  axis %= 2
  k = w.shape[axis]
  if group_size is None and fmt != "ternary":
    group_size = DEFAULT_GROUP_SIZE.get(fmt, k)
  if group_size is not None:
    try:
      group_size = operator.index(group_size)
    except TypeError:
      raise ValueError(f"group_size must be an int or None, got {group_size!r}") from None
    if group_size <= 0 or k % group_size:
      raise ValueError(f"group_size={group_size} must be a positive divisor of "
                       f"w.shape[{axis}]={k} for fmt={fmt!r}")
    if fmt in PACKED_FORMATS and group_size % 2:
      raise ValueError(f"group_size={group_size} must be even for fmt={fmt!r} "
                       "(two 4-bit codes per byte)")
  if not symmetric and fmt != "int4":
    raise ValueError(f"symmetric=False (zero points) is only for fmt='int4', got fmt={fmt!r}")
  if double_quant and fmt not in ("nf4", "fp4"):
    raise ValueError(f"double_quant=True is only for fmt='nf4' or 'fp4', got fmt={fmt!r}")
  return _quantize(w, fmt=fmt, group_size=group_size, axis=axis,
                   symmetric=bool(symmetric), double_quant=bool(double_quant))


@functools.lru_cache(maxsize=256)
def _storage_spec(fmt, shape, group_size, axis, symmetric, double_quant):
  """(shape, dtype) of every field of a valid QuantizedWeight with this metadata."""
  out = jax.eval_shape(functools.partial(
      reference.quantize, fmt=fmt, group_size=group_size, axis=axis,
      symmetric=symmetric, double_quant=double_quant), jax.ShapeDtypeStruct(shape, jnp.float32))
  return {f: None if getattr(out, f) is None else (getattr(out, f).shape, getattr(out, f).dtype)
          for f in ("values", "scales", "zeros", "scale_scales", "scale_offset")}


def _check_qw(qw: Any) -> None:
  if not isinstance(qw, QuantizedWeight):
    raise ValueError(f"qw must be a QuantizedWeight (from quant.quantize), got {type(qw).__name__}")
  if qw.fmt not in FORMATS or len(qw.shape) != 2 or qw.axis not in (0, 1):
    raise ValueError(f"qw has invalid metadata fmt={qw.fmt!r} shape={qw.shape} axis={qw.axis}")
  spec = _storage_spec(qw.fmt, tuple(qw.shape), qw.group_size, qw.axis, qw.symmetric, qw.double_quant)
  for field, want in spec.items():
    a = getattr(qw, field)
    got = None if a is None else (tuple(a.shape), jnp.dtype(a.dtype))
    if got != (None if want is None else (tuple(want[0]), jnp.dtype(want[1]))):
      raise ValueError(
          f"qw.{field} has (shape, dtype) {got}, expected {want} for fmt={qw.fmt!r} "
          f"shape={qw.shape} group_size={qw.group_size}; a stack of weights must be vmapped over")


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """The float weight ``w_hat`` [K, N] of ``qw`` in ``dtype``."""
  _check_qw(qw)
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype).name}")
  return _dequantize(qw, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(qw, dtype):
  return reference.dequantize(qw, dtype)


# --------------------------------------------------------------------------
# quantized_matmul
# --------------------------------------------------------------------------

class _Config(NamedTuple):
  impl: str
  act_fmt: str | None
  outlier_threshold: float | None
  interpret: Any
  block_sizes: tuple[int, int, int] | None


def _kernel_weight_only(x, qw, cfg, *, transpose=False, out_dtype=None):
  scales = reference.decoded_scales(qw)
  bias = None if qw.zeros is None else -qw.zeros.astype(jnp.float32) * scales
  return _KERNELS[cfg.impl].matmul(
      x, qw.values, scales, bias, fmt=qw.fmt, symmetric=qw.symmetric,
      group_size=qw.group_size, block_sizes=cfg.block_sizes, transpose=transpose,
      out_dtype=out_dtype, interpret=cfg.interpret)


def _forward(x, qw, cfg):
  if cfg.impl == "xla":
    return reference.matmul(x, qw, cfg.act_fmt, cfg.outlier_threshold)
  if cfg.act_fmt is None:
    return _kernel_weight_only(x, qw, cfg)
  y, x_in = 0.0, x
  if cfg.outlier_threshold is not None:  # LLM.int8(): float part on the outlier columns
    mask = reference.outlier_mask(x, cfg.outlier_threshold)
    y = _kernel_weight_only(jnp.where(mask, x, 0), qw, cfg, out_dtype=jnp.float32)
    x_in = jnp.where(mask, 0, x)
  xq, sx = reference.quantize_activations(x_in, "int8")
  y = y + _KERNELS[cfg.impl].w8a8_matmul(xq, sx, qw.values, qw.scales,
                                         block_sizes=cfg.block_sizes, interpret=cfg.interpret)
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmm(x, qw, cfg):
  return _forward(x, qw, cfg)


def _qmm_fwd(x, qw, cfg):
  return _forward(x, qw, cfg), qw


def _qmm_bwd(cfg, qw, g):
  if cfg.impl == "xla":
    dx = reference.weight_only_matmul_t(g, qw)
  else:
    dx = _kernel_weight_only(g, qw, cfg, transpose=True)
  return dx.astype(g.dtype), reference.zero_cotangent(qw)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)
_qmm_jit = jax.jit(_qmm, static_argnums=2)


def _kernel_problem(kernel: str, x, qw: QuantizedWeight, act_fmt, block_sizes):
  """(BlockSizes, None) if ``kernel`` can run this call, else (None, reason)."""
  mod = _KERNELS[kernel]
  if qw.fmt not in mod.KERNEL_FORMATS:
    return None, f"fmt={qw.fmt!r} has no {kernel} kernel (kernels: {mod.KERNEL_FORMATS})"
  if qw.axis != 0:
    return None, "kernels need weights quantized along axis=0"
  if act_fmt == "fp8" or (act_fmt == "int8" and qw.fmt != "int8"):
    return None, f"act_fmt={act_fmt!r} with fmt={qw.fmt!r} has no kernel (W8A8 kernels: int8 weights)"
  if x.dtype not in [jnp.dtype(d) for d in mod.X_DTYPES]:
    return None, f"x dtype {x.dtype} is not supported by {kernel}"
  k, n = qw.shape
  m = math.prod(x.shape[:-1])
  if m == 0:
    return None, "x is empty"
  dtype = jnp.int8 if act_fmt == "int8" else x.dtype
  bs = block_sizes or BlockSizes.get_default((m, k, n), dtype, device_kind(), kernel=kernel,
                                             fmt=qw.fmt, group_size=qw.group_size)
  err = bs.error((m, k, n), dtype, kernel=kernel, fmt=qw.fmt, group_size=qw.group_size)
  return (None, err) if err else (bs, None)


def _check_act(qw: QuantizedWeight, act_fmt, outlier_threshold) -> float | None:
  if act_fmt not in ACT_FORMATS:
    raise ValueError(f"act_fmt must be one of {ACT_FORMATS}, got {act_fmt!r}")
  if act_fmt is not None:
    allowed = _INT_FORMATS if act_fmt == "int8" else ("fp8",)
    if qw.fmt not in allowed:
      raise ValueError(f"act_fmt={act_fmt!r} needs weights in {allowed}, got fmt={qw.fmt!r}")
    if qw.axis != 0 or qw.scales.shape[0] != 1:
      raise ValueError(
          f"act_fmt={act_fmt!r} needs one weight scale per output channel or tensor "
          f"(quantize with axis=0 and group_size=None, or K for int4), got "
          f"group_size={qw.group_size} axis={qw.axis}")
  if outlier_threshold is None:
    return None
  if act_fmt != "int8":
    raise ValueError(f"outlier_threshold (LLM.int8()) needs act_fmt='int8', got {act_fmt!r}")
  try:
    t = float(outlier_threshold)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"outlier_threshold must be a Python number, got {outlier_threshold!r}") from None
  if not (t > 0 and math.isfinite(t)):
    raise ValueError(f"outlier_threshold must be positive and finite, got {outlier_threshold!r}")
  return t


def quantized_matmul(x: jax.Array, qw: QuantizedWeight, *, act_fmt: str | None = None,
                     outlier_threshold: float | None = None, impl: str = "auto",
                     interpret: Any = None, block_sizes: BlockSizes | None = None) -> jax.Array:
  """``y = x @ dequantize(qw)`` with the weight kept quantized.

  Args:
    x: [..., K], float32 / bfloat16 / float16; the output has x's dtype,
      accumulation is float32 (int32 for W8A8).
    qw: a ``QuantizedWeight`` of logical shape [K, N].
    act_fmt: ``None`` (weight-only), ``"int8"`` (W8A8: dynamic per-token
      int8 activations, int32 accumulation; weights int8 / int4 / ternary
      with one scale per channel or tensor) or ``"fp8"`` (per-token e4m3
      activations with per-channel fp8 weights).
    outlier_threshold: LLM.int8() with ``act_fmt="int8"``: feature columns of
      x with any ``|x| >= outlier_threshold`` use the float weights.
    impl: ``"auto" | "xla" | "pallas_tpu" | "pallas_gpu"``. ``"auto"`` is
      XLA until a kernel is measured faster (the tables are empty).
    interpret: run a Pallas kernel in interpret mode (``ops.config``).
    block_sizes: kernel tile sizes; default ``BlockSizes.get_default``.

  Returns:
    [..., N] in x's dtype.
  """
  _check_qw(qw)
  x = jnp.asarray(x)
  check_float("x", x)
  k, n = qw.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x must have shape [..., K] with K={k} (qw.shape={qw.shape}), "
                     f"got {tuple(x.shape)}")
  threshold = _check_act(qw, act_fmt, outlier_threshold)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  problems = {kern: _kernel_problem(kern, x, qw, act_fmt, block_sizes) for kern in _KERNELS}
  if impl in _KERNELS and problems[impl][1]:
    raise ValueError(f"quantized_matmul: impl={impl!r} cannot run this call: {problems[impl][1]}")
  impl = select_impl(impl, op="quantized_matmul",
                     supported=lambda kern: problems[kern][1] is None,
                     measured_faster={**tpu.MEASURED_FASTER, **gpu.MEASURED_FASTER})
  kernel_cfg = impl != "xla"
  cfg = _Config(impl=impl, act_fmt=act_fmt, outlier_threshold=threshold,
                interpret=config.resolve_interpret(interpret, _TARGET[impl]) if kernel_cfg else None,
                block_sizes=problems[impl][0].astuple() if kernel_cfg else None)
  m = math.prod(x.shape[:-1])
  y = _qmm_jit(x.reshape(m, k), qw, cfg)
  return y.reshape(*x.shape[:-1], n)
