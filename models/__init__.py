"""Flax NNX model families built on ops/: transformer (griffin, linear_rnn to come).

``build(model_cfg, rngs=...)`` constructs the family named by
``model_cfg.family`` from a ``config.model`` block.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from models import transformer

_FAMILIES: dict[str, Callable[..., nnx.Module]] = {
    "transformer": lambda cfg, rngs: transformer.Transformer(
        transformer.TransformerConfig.from_config(cfg), rngs=rngs),
}


def build(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of family ``model_cfg["family"]``, initialised from ``rngs``."""
  family = model_cfg["family"]
  if family not in _FAMILIES:
    raise ValueError(f"model.family must be one of {sorted(_FAMILIES)}, got {family!r}")
  return _FAMILIES[family](model_cfg, rngs)
