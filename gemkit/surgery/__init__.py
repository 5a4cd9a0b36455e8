"""Model surgery: pure functions from a model to a model.

``quantize`` (post-training quantization of Dense layers by rules),
``lora`` (LoRA / DoRA / PiSSA / QLoRA adapters: wrap, merge, unmerge, save
and load one adapter), ``finetuned`` (a fine-tuning method's model from its
float base) and ``paths`` (module paths and the rule selection they share).

This package imports ``models``, ``ops`` and gemkit's config and checkpoint
modules only, never ``gemkit.runs`` or a driver (``gemkit.train``,
``gemkit.studies``): drivers hand it a model, and ``gemkit.runs.load``
rebuilds any saved run through it.
"""
