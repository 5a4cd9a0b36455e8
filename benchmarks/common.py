"""What every benchmark script shares: timing, the machine's name, the JSON file.

The scripts put the repository root on ``sys.path`` and import this as
``benchmarks.common``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from typing import Any, Callable

import jax

# The Pallas implementation of each accelerator backend (ops' ``impl``).
KERNEL_IMPL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn: Callable[..., Any], *args, iters: int) -> tuple[float, float]:
  """(median, min) milliseconds of ``fn(*args)`` over ``iters`` calls, each
  waited for, after one call that compiles and warms up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times), min(times)


def machine() -> str:
  """A file-name-safe name of the device: "cpu-2core-x86_64", "nvidia-h100-80gb-hbm3"."""
  if jax.default_backend() == "cpu":
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"
  return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def write_json(result: Any, name: str, out: str | None = None) -> str:
  """Writes ``result`` to ``out`` (default ``benchmarks/results/<name>_<machine>.json``)."""
  out = out or os.path.join(RESULTS, f"{name}_{machine()}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  return out
