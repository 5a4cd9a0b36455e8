"""gemkit: config, data, training, checkpoints, sharding, sampling.

``gemkit.load(path)`` returns ``(model, config)`` from a run directory or one
of its checkpoints (float, quantized or fine-tuned with adapters), or from a
Hugging Face model directory (``gemkit.runs.load``). ``gemkit.hf`` (import
and export of Hugging Face checkpoints), ``gemkit.surgery`` (quantization
and adapters), ``gemkit.studies`` and the other submodules load on first
use, so ``from gemkit import config`` imports neither jax nor orbax.
"""

import importlib

__all__ = ["load"]


def load(path, step=None):
  """``gemkit.runs.load``: (model, config) of a run, one of its checkpoints or a HF directory."""
  return importlib.import_module("gemkit.runs").load(path, step)


def __getattr__(name: str):
  """``gemkit.hf``, ``gemkit.tokenizer``, ...: submodules imported on first access."""
  try:
    return importlib.import_module(f"gemkit.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"gemkit.{name}":     # a dependency of the submodule is missing
      raise
    raise AttributeError(f"module 'gemkit' has no attribute {name!r}") from None
