"""Experiment drivers that take a model and measure something about it.

``quantize`` (quantized copies of a model and their held-out bpb),
``finetune`` (full / LoRA / DoRA / QLoRA / PiSSA fine-tuning compared on a
task) and ``state_tracking`` (which recurrent mixers learn modular
counting). Each is one launcher's work (``launch.quantize``,
``launch.finetune``, ``launch.state_tracking``); a driver changes a model
only through ``gemkit.surgery``.
"""
