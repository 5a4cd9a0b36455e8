"""Train and score the state-tracking grid (Grazzi et al. 2024): parity and mod-k
counting, for each mixer and eigenvalue range of the config.

  python -m launch.state_tracking                 # experiments/state_tracking.py
  python -m launch.state_tracking --config.task.moduli="(2,)" \\
      --config.task.mixers="('deltanet',)" --config.train.steps=300

Prints progress and a Markdown table (the answer's accuracy at the training
length and at each test length) and writes the rows as JSON (default
runs/<config.name>/results.json).
"""

import json
import pathlib
import sys
import time

from absl import flags

from gemkit import config as config_lib
from gemkit import metrics
from gemkit.studies import state_tracking

_CONFIG = config_lib.define_config_flag("experiments/state_tracking.py")
_OUTPUT = flags.DEFINE_string("output", None,
                              "JSON results (default runs/<config.name>/results.json).")


def _run():
  config = _CONFIG.value
  start = time.perf_counter()
  rows = state_tracking.run(config, log=lambda line: print(line, flush=True))
  elapsed = time.perf_counter() - start
  output = pathlib.Path(_OUTPUT.value or pathlib.Path("runs") / config.name / "results.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps({
      "command": " ".join(["python -m launch.state_tracking"] + sys.argv[1:]),
      "machine": metrics.machine(),
      "elapsed_s": round(elapsed, 1), "config": config.to_dict(), "rows": rows}, indent=1))
  print(state_tracking.table(rows, config))
  print(f"total {elapsed / 60:.1f} min; results: {output}")


if __name__ == "__main__":
  config_lib.launch(_run, validator=state_tracking.validate)
