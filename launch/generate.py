"""Sample text from a run's checkpoint or a Hugging Face directory (cache decoding).

  python -m launch.generate --workdir=runs/lm_tiny --prompt="def " \\
      --max_new_tokens=200 --temperature=0.8 --top_k=40 --top_p=0.95
  python -m launch.generate --checkpoint=/models/Qwen2.5-0.5B --prompt="The capital of"

Prompts are encoded with the run's tokenizer (the directory's tokenizer.json).
"""

from absl import flags

from gemkit import config as config_lib
from gemkit import runs, sample

_WORKDIR = flags.DEFINE_string("workdir", "runs/lm_tiny", "Run directory to load.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A run directory, its checkpoints/ or checkpoints/<step>, or a "
    "Hugging Face model directory (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["def "], "Prompt(s); repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1: all).", lower_bound=0.0,
                            upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _run():
  path = _CHECKPOINT.value or _WORKDIR.value
  model, _ = runs.load(path, _STEP.value)
  texts = sample.generate(model, _PROMPT.value, tokenizer=runs.load_tokenizer(path),
                          max_new_tokens=_MAX_NEW.value,
                          temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                          top_p=_TOP_P.value, seed=_SEED.value)
  for prompt, text in zip(_PROMPT.value, texts):
    print(f"{prompt}{text}\n{'-' * 40}")


if __name__ == "__main__":
  config_lib.launch(_run)
