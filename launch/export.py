"""Export a run (or a Hugging Face directory) as a Hugging Face model directory.

  python -m launch.export --checkpoint=runs/lm_tiny --out=/tmp/lm_tiny_hf
  python -m launch.export --checkpoint=runs/ft/lora --out=/tmp/ft_merged   # adapters merged

The directory has config.json, safetensors weights (sharded with an index
above --max_shard_mb) and the run's tokenizer (tokenizer.json: the byte
tokenizer's own for gemkit-trained runs), so that
``transformers.AutoModelForCausalLM.from_pretrained(out)`` gives the same
logits. The architecture is the first that can express the model
(gemkit.hf.architectures): an imported model goes back to its own, a gemkit
transformer goes out as Gemma (sqrt(d) embeddings) with its own activation.
"""

from absl import flags

from gemkit import config as config_lib
from gemkit import hf, runs

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A run directory, its checkpoints/ or checkpoints/<step>, or a "
    "Hugging Face directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_MAX_SHARD_MB = flags.DEFINE_integer("max_shard_mb", 5120, "Largest safetensors file (MiB).",
                                     lower_bound=1)


def _run():
  model, config = runs.load(_CHECKPOINT.value, _STEP.value)
  if config is None:
    raise config_lib.ConfigError("checkpoint", f"{_CHECKPOINT.value} records no config")
  tokenizer = runs.load_tokenizer(_CHECKPOINT.value)
  try:
    out = hf.save(model, config, _OUT.value, tokenizer=tokenizer,
                  max_shard_size=_MAX_SHARD_MB.value * 2**20)
  except ValueError as e:
    raise config_lib.ConfigError("checkpoint", str(e)) from None
  files = sorted(p.name for p in out.iterdir())
  print(f"wrote {out}: {', '.join(files)}")


if __name__ == "__main__":
  config_lib.launch(_run)
