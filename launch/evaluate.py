"""Evaluate a checkpoint: held-out perplexity, JSONL tasks, synthetic suites.

  python -m launch.evaluate --workdir=runs/lm_tiny \\
      --tasks=heldout_bpb,heldout_bpb_sliding,stdlib_mc,stdlib_complete,mqar,passkey
  python -m launch.evaluate --checkpoint=runs/lm_tiny/checkpoints/600 --tasks=parity \\
      --config.parity.lengths=8,16 --max_examples=16
  python -m launch.evaluate --workdir=runs/lm_tiny --tasks=heldout_bpb \\
      --compare=float=runs/lm_tiny --compare=int8=runs/lm_tiny_int8

Tasks: heldout_bpb (disjoint windows), heldout_bpb_sliding, the synthetic
suites mqar, passkey, parity, modcount, arithmetic, and JSONL task files
(a path ending in .jsonl, or the stem of a file in experiments/tasks/).
``--config`` (default experiments/eval_default.py) sets how each task runs.
Writes a JSON report (every number and its settings), PNG plots, and prints a
Markdown table.
"""

import pathlib

from absl import flags

from gemkit import config as config_lib
from gemkit import metrics
from gemkit import evaluate

_CONFIG = config_lib.define_config_flag(evaluate.DEFAULT_EVAL_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A run directory, its checkpoints/ or checkpoints/<step>.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TASKS = flags.DEFINE_list("tasks", ["heldout_bpb", "mqar", "passkey"], "Tasks to run.")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "At most this many examples per task setting (documents for "
    "perplexity).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.",
                                   lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None,
                              "JSON report (default: <run>/eval/step_<step>.json).")
_PLOTS_DIR = flags.DEFINE_string("plots_dir", None,
                                 "PNG plots (default: <run>/eval/plots; '' for none).")
_COMPARE = flags.DEFINE_multi_string(
    "compare", [], "label=checkpoint: held-out bits-per-byte of each, plotted side by side "
    "(e.g. float vs quantized variants).")


def _run():
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    raise config_lib.ConfigError("checkpoint", "give exactly one of --workdir or --checkpoint")
  pairs = []
  for item in _COMPARE.value:
    label, sep, path = item.partition("=")
    if not sep or not label or not path:
      raise config_lib.ConfigError("compare", f"expected label=checkpoint, got {item!r}")
    pairs.append((label, path))
  checkpoint = _WORKDIR.value or _CHECKPOINT.value
  report = evaluate.run(checkpoint, _TASKS.value, step=_STEP.value, eval_config=_CONFIG.value,
                        batch_size=_BATCH_SIZE.value, max_examples=_MAX_EXAMPLES.value)
  if pairs:
    report["bpb_variants"] = evaluate.compare_bpb(
        pairs, eval_config=_CONFIG.value, batch_size=_BATCH_SIZE.value,
        max_examples=_MAX_EXAMPLES.value)
  s = report["settings"]
  eval_dir = pathlib.Path(s["workdir"]) / "eval"
  output = metrics.write_json(report, _OUTPUT.value or eval_dir / f"step_{s['step']}.json")
  plots_dir = eval_dir / "plots" if _PLOTS_DIR.value is None else _PLOTS_DIR.value
  plots = evaluate.write_plots(report, plots_dir, report.get("bpb_variants", ())) \
      if plots_dir else []
  print(f"{s['workdir']} step {s['step']}  (commit {(s['git_commit'] or '?')[:10]}"
        f"{'+dirty' if s['git_dirty'] else ''}, corpus {s['corpus_fingerprint']})")
  for row in report["results"]:
    if "protocol" in row:
      print(f"{row['task']}: {row['protocol']}; {row['source']}")
  print(evaluate.markdown_table(report["results"]))
  for v in report.get("bpb_variants", ()):
    delta = ("" if v["delta"] is None else
             f", {v['delta']:+.5f} ± {v['delta_stderr'] or 0:.5f} vs {pairs[0][0]} (paired)")
    print(f"bpb {v['label']}: {v['bits_per_byte']:.4f} ± {v['stderr'] or 0:.4f}{delta} "
          f"({v['checkpoint']})")
  print(f"report: {output}" + (f"\nplots: {', '.join(map(str, plots))}" if plots else ""))


if __name__ == "__main__":
  config_lib.launch(_run, validator=evaluate.validate_config)
