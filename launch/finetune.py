"""Fine-tune a trained run: full fine-tuning, LoRA, DoRA, QLoRA (and PiSSA), compared.

  python -m launch.finetune                                # experiments/finetune_arithmetic.py
  python -m launch.finetune --config.methods=lora --config.lora.rank=4 \\
      --config.base.workdir=runs/lm_tiny_v2 --workdir=/tmp/ft

  # any {"prompt", "completion"} JSONL file (loss on the completion only):
  python -m launch.finetune --config.task.kind=jsonl --config.task.path=data.jsonl

Each method trains in <workdir>/<method> (re-running resumes; --overwrite
restarts), adapters are also saved alone in <workdir>/<method>/adapter; with
--config.seeds=N > 1, in <workdir>/seed<s>/<method> for N seeds, and the table
gives each figure's mean, standard deviation and per-seed values.
--export_peft=DIR also writes each adapter method's adapter as a PEFT LoRA
directory, DIR/<method> (DIR/seed<s>/<method> with several seeds), which
peft.PeftModel.from_pretrained loads onto the Hugging Face base.
Prints one table row per method (exact match, held-out completion loss,
trainable parameters, optimizer-state and frozen bytes, XLA step peak memory,
step time) and writes the report as JSON (and Markdown next to it);
``python benchmarks/finetune_targets.py <the JSON>`` judges it against the
acceptance targets.
"""

import pathlib

from absl import flags

from gemkit import config as config_lib
from gemkit import metrics
from gemkit import runs
from gemkit.studies import finetune

_CONFIG = config_lib.define_config_flag("experiments/finetune_arithmetic.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config.name>).")
_JSON = flags.DEFINE_string("json", None, "Report path (default: <workdir>/finetune.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Restart methods whose run directories exist.")
_EXPORT_PEFT = flags.DEFINE_string(
    "export_peft", None, "Also write each adapter method's adapter as a PEFT LoRA directory "
    "<export_peft>/<method> (<export_peft>/seed<s>/<method> with several seeds).")


def _run():
  cfg = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value or pathlib.Path("runs") / cfg.name)
  base = finetune.Base(runs.load_source(*finetune.base_path(cfg)))
  report = finetune.run_seeds(cfg, base, workdir, overwrite=_OVERWRITE.value,
                              log=lambda line: print(line, flush=True),
                              export_peft=_EXPORT_PEFT.value or None)
  path = metrics.write_json(report, _JSON.value or workdir / "finetune.json")
  table = finetune.markdown_table(report)
  path.with_suffix(".md").write_text(table + "\n")
  print(table)
  if _EXPORT_PEFT.value:
    print(f"PEFT adapters: {_EXPORT_PEFT.value}")
  print(f"{report['machine']}; JSON: {path}")


if __name__ == "__main__":
  config_lib.launch(_run, validator=finetune.validate_config)
