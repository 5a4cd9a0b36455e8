"""gemkit: config, data, training, checkpoints, sharding, sampling.

``gemkit.load(workdir)`` returns ``(model, config)`` from a run directory.
"""

from gemkit.runs import load

__all__ = ["load"]
