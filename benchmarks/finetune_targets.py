"""Judges a fine-tuning comparison against the issue's acceptance targets.

  python benchmarks/finetune_targets.py runs/finetune_arithmetic/finetune.json

reads the report that ``python -m launch.finetune`` writes (one seed or the
summary over several: the rows then hold the means) and prints each target
with the number it compares and whether it is met:

  lora_gain_ge_95pct_of_full      LoRA's share of full fine-tuning's exact-match gain >= 0.95
  lora_trainable_le_2pct          LoRA trains <= 2% of the parameters
  lora_opt_state_le_3pct_of_full  LoRA's optimizer state <= 3% of full fine-tuning's
  qlora_within_2_points_of_lora   QLoRA's exact match at most 2 points below LoRA's

A target whose methods are not in the report is left out. ``--json`` prints
the same as JSON. The thresholds live here, not in ``gemkit.studies.finetune``: the
library reports what it measured; this script judges it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def targets(rows: Sequence[dict]) -> dict:
  """Each target's number (``value``) and whether it is ``met``, from a report's rows."""
  by = {r["method"]: r for r in rows}
  out = {}
  if "lora" in by and "full" in by:
    r, f = by["lora"], by["full"]
    out["lora_gain_ge_95pct_of_full"] = {"value": r["em_gain_vs_full"],
                                         "met": (r["em_gain_vs_full"] or 0) >= 0.95}
    out["lora_trainable_le_2pct"] = {"value": r["trainable_pct"],
                                     "met": r["trainable_pct"] <= 2.0}
    ratio = r["opt_state_bytes"] / f["opt_state_bytes"]
    out["lora_opt_state_le_3pct_of_full"] = {"value": 100 * ratio, "met": ratio <= 0.03}
  if "lora" in by and "qlora" in by:
    gap = 100 * (by["lora"]["exact_match"] - by["qlora"]["exact_match"])
    out["qlora_within_2_points_of_lora"] = {"value": gap, "met": gap <= 2.0}
  return out


def format_targets(judged: dict) -> str:
  lines = []
  for name, t in judged.items():
    value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
    lines.append(f"{name}: {value} {'met' if t['met'] else 'NOT met'}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("report", help="the JSON report of python -m launch.finetune")
  parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
  args = parser.parse_args(argv)
  with open(args.report) as f:
    report = json.load(f)
  judged = targets(report["rows"])
  print(json.dumps(judged, indent=1) if args.json else format_targets(judged))
  return 0


if __name__ == "__main__":
  sys.exit(main())
