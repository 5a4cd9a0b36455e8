"""A small byte-level gated DeltaNet LM (Yang et al. 2024) on the Python stdlib.

  python -m launch.train --config=experiments/deltanet_tiny.py
  python -m launch.train --config=experiments/deltanet_tiny.py \\
      --config.model.mixer=deltanet --config.model.eigenvalue_range=[-1,1]
"""

from experiments import gla_tiny


def get_config():
  c = gla_tiny.get_config()
  c.name = "deltanet_tiny"
  c.model = gla_tiny.linear_rnn_model("gated_deltanet")
  return c
