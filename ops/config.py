"""Process-wide defaults for the ops: the interpret mode of Pallas kernels.

A Pallas kernel runs natively on its backend and, on a CPU, only in interpret
mode. Every public op takes ``interpret=None``; ``None`` means "use the
process-wide default set here", and if that is also ``None`` the kernel runs
natively on TPU/GPU and in interpret mode on CPU (so ``impl="pallas_tpu"`` on a
laptop simulates the TPU kernel instead of failing).

>>> from ops import config
>>> config.set_interpret(True)               # every kernel: generic interpreter
>>> with config.interpret_mode(False): ...   # scoped override

The environment variable ``GEMKIT_INTERPRET`` sets the process-wide default
when ``ops`` is imported: ``0`` (also ``false``/``no``) compiles every kernel
for the device (what ``benchmarks/accel.sh`` runs the kernel tests under),
``1`` (``true``/``yes``) interprets every kernel, unset or empty leaves the
default at ``None`` (interpret on CPU, compiled on TPU/GPU).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

import jax

ENV_VAR = "GEMKIT_INTERPRET"
_ENV_VALUES = {"": None, "0": False, "false": False, "no": False,
               "1": True, "true": True, "yes": True}


def interpret_from_env(environ=os.environ) -> Any:
  """The default that ``GEMKIT_INTERPRET`` asks for (None when unset)."""
  raw = environ.get(ENV_VAR, "")
  try:
    return _ENV_VALUES[raw.strip().lower()]
  except KeyError:
    raise ValueError(f"{ENV_VAR} must be one of 0, 1, true, false, yes, no or "
                     f"empty, got {raw!r}") from None


_state = threading.local()
_global_default: Any = interpret_from_env()


def set_interpret(value: Any) -> None:
  """Sets the process-wide interpret default (None, bool or InterpretParams)."""
  global _global_default
  _global_default = value


@contextlib.contextmanager
def interpret_mode(value: Any) -> Iterator[None]:
  """Overrides the interpret default inside a ``with`` block (this thread)."""
  previous = getattr(_state, "value", _Unset)
  _state.value = value
  try:
    yield
  finally:
    if previous is _Unset:
      del _state.value
    else:
      _state.value = previous


class _Unset:
  pass


def get_interpret() -> Any:
  """The interpret default in force: the scoped one, else the global one."""
  value = getattr(_state, "value", _Unset)
  return _global_default if value is _Unset else value


def resolve_interpret(interpret: Any, target: str) -> Any:
  """The value to pass to ``pl.pallas_call(interpret=...)``.

  Args:
    interpret: the op's ``interpret`` argument (None: use the default).
    target: ``"tpu"`` or ``"gpu"``, the hardware the kernel is written for.

  Returns:
    ``False`` to run natively; on a CPU backend (or when asked) an interpret
    setting: ``pltpu.InterpretParams()`` for TPU kernels (simulates VMEM, DMAs,
    semaphores) and ``True`` for Triton GPU kernels.
  """
  if interpret is None:
    interpret = get_interpret()
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if interpret is True and target == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.InterpretParams()
  return interpret
