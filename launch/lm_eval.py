"""lm-evaluation-harness's command line with gemkit's model ``gemkit`` registered.

  python -m launch.lm_eval --model gemkit --model_args pretrained=runs/lm_tiny \\
      --tasks lambada_openai,hellaswag --batch_size 16 --output_path results/
  python -m launch.lm_eval --model gemkit \\
      --model_args pretrained=/models/Llama-3.2-1B,dtype=bfloat16,quantize=int4-g128 \\
      --tasks arc_easy

Every argument is lm-eval's own (``lm_eval --help``); this starts
``jax.distributed`` from the environment when the process is one of several
(``gemkit.sharding.initialize_distributed``), imports ``gemkit.lm_harness``
(which registers the model) and runs ``lm_eval.__main__.cli_evaluate``. The
``gemkit-lm-eval`` console script is the same function.
"""


def main() -> None:
  # Imports in order: jax.distributed must start before anything touches a backend.
  from gemkit import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed()
  import gemkit.lm_harness  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  cli_evaluate()


if __name__ == "__main__":
  main()
