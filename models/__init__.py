"""Flax NNX model families built on ops/: transformer, griffin (Griffin, Hawk), linear_rnn.

``build(model_cfg, rngs=...)`` constructs the family named by
``model_cfg.family`` from a ``config.model`` block.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from models import griffin, layers, linear_rnn, transformer

# family -> (config dataclass with from_config, model class)
_FAMILIES: dict[str, tuple[Any, Any]] = {
    "transformer": (transformer.TransformerConfig, transformer.Transformer),
    "griffin": (griffin.GriffinConfig, griffin.Griffin),
    "linear_rnn": (linear_rnn.LinearRNNConfig, linear_rnn.LinearRNN),
}


def family_config(model_cfg: Mapping[str, Any]):
  """The family's config dataclass from a ``config.model`` block (a ValueError
  names an unknown key or a value that cannot work)."""
  family = model_cfg["family"]
  if family not in _FAMILIES:
    raise layers.FieldError("family", f"must be one of {sorted(_FAMILIES)}, got {family!r}")
  return _FAMILIES[family][0].from_config(model_cfg)


def build(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of family ``model_cfg["family"]``, initialised from ``rngs``."""
  return _FAMILIES[model_cfg["family"]][1](family_config(model_cfg), rngs=rngs)
