"""Helpers shared by the op packages: ``impl`` dispatch, padding, validation."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
_KERNEL_OF_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}


def device_kind() -> str:
  """``jax.devices()[0].device_kind`` (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3")."""
  return jax.devices()[0].device_kind


def select_impl(impl: str, *, op: str, supported: Callable[[str], bool],
                measured_faster: Mapping[str, Callable[[], bool]]) -> str:
  """Resolves ``impl`` to ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"``.

  ``"auto"`` picks the Pallas kernel of the current backend only when
  ``supported(kernel)`` holds for this shape/dtype and ``measured_faster``
  has an entry for this ``device_kind`` whose predicate holds (the table of
  measurements lives next to the kernel); otherwise ``"xla"``. On CPU
  ``"auto"`` is always ``"xla"``.

  Args:
    impl: the user's choice, one of ``IMPLS``.
    op: the op's name, for error messages.
    supported: ``kernel_name -> bool``; whether that kernel handles the input.
    measured_faster: ``device_kind -> (() -> bool)``; where a kernel was
      measured faster than XLA, and for which inputs.
  """
  if impl not in IMPLS:
    raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    if impl != "xla" and not supported(impl):
      raise ValueError(f"{op}: impl={impl!r} does not support these inputs; "
                       "use impl='xla' or 'auto'")
    return impl
  kernel = _KERNEL_OF_BACKEND.get(jax.default_backend())
  if kernel is None or not supported(kernel):
    return "xla"
  faster = measured_faster.get(device_kind())
  return kernel if faster is not None and faster() else "xla"


def may_use_kernel(impl: str) -> bool:
  """Whether ``impl`` can resolve to a Pallas kernel on this backend (then a
  sharded model runs the op per shard, ``models.layers.shard_map_op``).

  True for an explicit ``"pallas_tpu"``/``"pallas_gpu"`` and for ``"auto"`` on
  TPU and GPU; ``"auto"`` on CPU and ``"xla"`` are XLA, which the SPMD
  partitioner shards by itself.
  """
  return impl in _KERNEL_OF_BACKEND.values() or (
      impl == "auto" and jax.default_backend() in _KERNEL_OF_BACKEND)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(x: int, multiple: int) -> int:
  return cdiv(x, multiple) * multiple


def next_pow2(n: int) -> int:
  """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
  return 1 << (max(int(n), 1) - 1).bit_length()


def is_pow2(n: int) -> bool:
  """Whether ``n`` is a positive power of two."""
  return n > 0 and n & (n - 1) == 0


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  """Pads ``x`` along ``axis`` with ``value`` up to a multiple of ``multiple``."""
  size = x.shape[axis]
  extra = round_up(size, multiple) - size
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
  """ValueError unless ``x`` has ``rank`` dims (``layout`` names them)."""
  if x.ndim != rank:
    raise ValueError(f"{name} must have shape {layout} (rank {rank}), "
                     f"got shape {tuple(x.shape)}")


def check_float(name: str, x: jax.Array,
                allowed: Sequence = (jnp.float32, jnp.bfloat16, jnp.float16)) -> None:
  """ValueError unless ``x`` is one of the ``allowed`` floating dtypes."""
  if x.dtype not in [jnp.dtype(d) for d in allowed]:
    names = ", ".join(jnp.dtype(d).name for d in allowed)
    raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")
