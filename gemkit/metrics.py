"""Metric sinks: a live console line, a JSONL log and (optionally) TensorBoard.

``metrics.jsonl`` in the workdir has one JSON object per logged step
(``{"step": ..., "split": "train"|"eval", ...}``). On resume, lines beyond the
restored step are dropped so the log continues the curve without duplicates.
:func:`read` and :func:`plot` load and draw it (or ``Trainer.run``'s records).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

LN2 = math.log(2.0)   # nats per bit: bits = nats / LN2

# Peak dense bf16 FLOP/s per chip, for the MFU estimate (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
}


def peak_flops() -> float | None:
  """Peak FLOP/s of all devices (``PEAK_FLOPS`` x device count), None when the
  device kind has no known peak (CPUs among them)."""
  import jax  # pylint: disable=g-import-not-at-top
  peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  return None if peak is None else peak * jax.device_count()


def machine() -> str:
  """The devices a result was measured on: ``8 x TPU v5 lite, jax 0.10.2``, or
  ``2-core x86_64 CPU, jax 0.10.2`` on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}"
  return f"{jax.device_count()} x {dev.device_kind}, jax {jax.__version__}"


def format_flops(flops_per_sec: float, mfu: float | None) -> str:
  """``1.2 TFLOP/s MFU 41.0%``, or ``MFU n/a`` where no peak is known."""
  rate = f"{flops_per_sec / 1e12:.3g} TFLOP/s"
  return f"{rate} MFU {mfu:.1%}" if mfu is not None else f"{rate} (MFU n/a: no peak known)"


def table_row(row: dict, columns: Sequence[tuple[str, str, int]],
              heads: Sequence[str] | None = None) -> str:
  """One fixed-width console line of ``row``: per ``(key, format, width)`` of
  ``columns`` the formatted value (blank when missing or None); with ``heads``
  the header line first (the first column left-aligned, the rest right)."""
  line = "  ".join(fmt.format(row[key]) if row.get(key) is not None else " " * width
                   for key, fmt, width in columns)
  if heads is None:
    return line
  head = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                   for i, (h, (_, _, w)) in enumerate(zip(heads, columns)))
  return head + "\n" + line


def _json_value(x: Any) -> Any:
  """NumPy scalars as Python numbers, arrays and tuples as lists, the rest as str."""
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  if isinstance(x, (tuple, np.ndarray)):
    return list(x)
  return str(x)


def write_json(report: Any, path: str | pathlib.Path) -> pathlib.Path:
  """Writes a report (NumPy values included) as indented JSON; returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=1, default=_json_value) + "\n")
  return path


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Writes scalar metrics to console, ``<workdir>/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = False,
               stream: TextIO | None = None, is_main: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.stream = stream or sys.stdout
    self.is_main = is_main
    self.live = self.stream.isatty()
    self._tb = None
    if tensorboard and is_main:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError("train.tensorboard=True needs `pip install gemkit[tensorboard]`") from e
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops logged lines with step > ``step`` (used when resuming)."""
    if not self.is_main or not self.path.exists():
      return
    lines = [l for l in self.path.read_text().splitlines()
             if l.strip() and json.loads(l)["step"] <= step]
    self.path.write_text("".join(l + "\n" for l in lines))

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if not self.is_main:
      return
    record = {"step": int(step), "split": split, "time": time.time(), **values}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def progress(self, text: str, *, final: bool = False) -> None:
    """A status line: rewritten in place on a terminal, one line per call otherwise."""
    if not self.is_main:
      return
    if self.live:
      self.stream.write("\r\033[K" + text + ("\n" if final else ""))
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def print(self, text: str) -> None:
    if self.is_main:
      if self.live:
        self.stream.write("\r\033[K")
      self.stream.write(text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(source: str | pathlib.Path | Iterable[dict]) -> list[dict]:
  """Metric records from a run directory, a ``metrics.jsonl`` path or records.

  Records are ``{"step", "split", ...}`` dicts, as ``Trainer.run`` returns
  (and ``Trainer.history`` accumulates) and ``metrics.jsonl`` holds.
  """
  if isinstance(source, (str, pathlib.Path)):
    path = pathlib.Path(source)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
      raise FileNotFoundError(f"no metrics log at {path}")
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return list(source)


def plot(source: str | pathlib.Path | Iterable[dict], keys: Sequence[str] = ("loss",), *,
         title: str | None = None):
  """One matplotlib figure of ``keys`` vs step: train as lines, eval as markers.

  ``source`` is what :func:`read` takes (a run directory, its
  ``metrics.jsonl`` or records such as ``trainer.run(steps=100)``'s). One
  panel per key; a split without the key is skipped. Returns the Figure
  (closed in pyplot, so a notebook shows it once, as the cell's value).

  >>> gemkit.metrics.plot(trainer.history, keys=("loss", "lr"))
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read(source)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for split, style in (("train", "-"), ("eval", "o--")):
      points = sorted((r["step"], r[key]) for r in records
                      if r.get("split") == split and isinstance(r.get(key), (int, float)))
      if points:
        ax.plot(*zip(*points), style, label=split, markersize=4)
    ax.set(xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  plt.close(fig)
  return fig
