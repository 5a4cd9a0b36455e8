"""Train a model from an experiment config.

  python -m launch.train                                  # experiments/lm_tiny.py
  python -m launch.train --config=experiments/lm_tiny.py \\
      --config.train.steps=200 --config.model.num_layers=4 --workdir=/tmp/run1

Re-running the same command resumes from the workdir's last checkpoint.
"""

from absl import app, flags, logging

from gemkit import config as config_lib
from gemkit import runs

_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config_lib.run_guarded(lambda: runs.train(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.flags_parser)
