"""A small byte-level Hawk (Griffin's recurrent blocks only) on the Python stdlib.

  python -m launch.train --config=experiments/hawk_tiny.py
"""

from experiments import griffin_tiny


def get_config():
  c = griffin_tiny.get_config()
  c.name = "hawk_tiny"
  c.model = griffin_tiny.griffin_model("R")
  return c
