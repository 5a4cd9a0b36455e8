"""gemkit: config, data, training, checkpoints, sharding, sampling.

``gemkit.load(path)`` returns ``(model, config)`` from a run directory or one
of its checkpoints (float, quantized or fine-tuned with adapters).
"""

from gemkit.runs import load

__all__ = ["load"]
