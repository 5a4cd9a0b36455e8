"""A fine-tuning method's model from its float base, as its checkpoints record it.

``settings`` is the JSON a fine-tuning run records under ``"finetune"`` in
every checkpoint's metadata (``gemkit.studies.finetune.method_settings``):

=================  ===============================================================
``method``         ``full`` (every parameter trains) or an adapter method
``adapter``        the adapter's name (adapter methods)
``rule``           its ``LoRARule`` fields
``quantization``   ``{"rules": [[regex, spec], ...]}`` to quantize the base first
                   (QLoRA), or None
``seed``           the adapter init's seed
=================  ===============================================================

:func:`build` turns (base, settings) into the model a Trainer trains, and
``gemkit.runs.load`` into the model whose trained parameters it restores.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from gemkit.surgery import lora, paths, quantize


def build(base_model: nnx.Module, fingerprint: str, settings: Mapping[str, Any]):
  """(model, trainable filter) of a method's ``settings``, from a clone of the float base.

  The clone shares the base's arrays: a Trainer copies the trained ones and
  only reads the frozen ones, so ``base_model`` stays usable. ``fingerprint``
  is the float base's ``lora.fingerprint`` (recorded by the adapters, also
  when the base is quantized first).
  """
  model = nnx.clone(base_model)
  if settings["method"] == "full":
    return model, nnx.Param
  if settings.get("quantization"):
    model, _ = quantize.quantize_model(model, settings["quantization"]["rules"])
  name = settings["adapter"]
  lora.apply_lora(model, lora.LoRARule(**settings["rule"]), name=name, seed=settings["seed"],
                  base_fingerprint=fingerprint)
  return model, lora.trainable(name)


def is_float_base(model: nnx.Module) -> bool:
  """Whether ``model`` has neither quantized layers nor adapters (what a method starts from)."""
  return not (any(d.is_quantized for _, d in paths.dense_layers(model)) or lora.wrappers(model))
