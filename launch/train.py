"""Train a model from an experiment config.

  python -m launch.train                                  # experiments/lm_tiny.py
  python -m launch.train --config=experiments/lm_tiny.py \\
      --config.train.steps=200 --config.model.num_layers=4 --workdir=/tmp/run1

Re-running the same command resumes from the workdir's last checkpoint.
On a TPU pod, under SLURM or across GPU hosts, run the same command on every
worker (see launch/README.md); SIGTERM saves a checkpoint and exits with 0.
"""

from absl import flags

from gemkit import config as config_lib
from gemkit import runs
from gemkit import sharding

_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process run (default: "
    "$JAX_COORDINATOR_ADDRESS; detected on Cloud TPU, SLURM and Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (default: $JAX_NUM_PROCESSES or detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (default: $JAX_PROCESS_ID "
    "or detected).")


def _train():
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  return runs.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  config_lib.launch(_train)
