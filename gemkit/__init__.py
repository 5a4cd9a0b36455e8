"""gemkit: config, data, training, checkpoints, sharding, sampling.

``gemkit.load(path)`` returns ``(model, config)`` from a run directory or one
of its checkpoints (float, quantized or fine-tuned with adapters), or from a
Hugging Face model directory. ``gemkit.hf`` (import and export of Hugging
Face checkpoints) and the other submodules load on first use.
"""

import importlib

from gemkit.runs import load

__all__ = ["load"]


def __getattr__(name: str):
  """``gemkit.hf``, ``gemkit.tokenizer``, ...: submodules imported on first access."""
  try:
    return importlib.import_module(f"gemkit.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"gemkit.{name}":     # a dependency of the submodule is missing
      raise
    raise AttributeError(f"module 'gemkit' has no attribute {name!r}") from None
