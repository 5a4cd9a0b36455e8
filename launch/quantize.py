"""Post-training quantization of a trained run: quantized run dirs + an accuracy table.

  python -m launch.quantize --workdir=runs/lm_tiny \\
      --formats=int8,int4-g128,nf4-g128,w8a8,w8a8-llm.int8
  # a Hugging Face model, evaluated on --config's data (encoded with its tokenizer):
  python -m launch.quantize --config.model.init_from=/models/Qwen2.5-0.5B \\
      --formats=int8,nf4-g64 --out_dir=runs/qwen_quant --eval_windows=32

Each format quantizes every Dense layer except those matching --keep_float
and is saved as a run directory <out_dir>/<format> (default out_dir:
<workdir>_quant) that launch.generate, launch.evaluate and gemkit.load read.
Prints per format: bytes of the Dense weights (and x of bf16), checkpoint bytes
on disk, held-out bits-per-byte and its change vs float; writes it as JSON.
Format specs: gemkit/surgery/quantize.py.
"""

from absl import flags

from gemkit import config as config_lib
from gemkit import metrics
from gemkit import runs
from gemkit.studies import quantize

_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "runs/lm_tiny", "Trained run directory to quantize "
                               "(unless --config.model.init_from names a HF directory).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_FORMATS = flags.DEFINE_list(
    "formats", "int8,int4-g128,int4-g128-asym,nf4-g128,int4-g64,nf4,nf4-dq,fp4,fp8,"
    "ternary,w8a8,w8a8-llm.int8", "Format specs, comma-separated.")
_KEEP_FLOAT = flags.DEFINE_string("keep_float", r"(.*/)?head",
                                  "Regex of Dense paths kept in float (full match).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where quantized runs go "
                               "(default: <workdir>_quant).")
_JSON = flags.DEFINE_string("json", None, "Report path (default: <out_dir>/quantize.json).")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", None, "Held-out windows of seq_len "
                                     "(default: the run's data.eval_windows).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", None, "Eval batch (default: train.batch_size).",
                              lower_bound=1)
_IMPL = flags.DEFINE_enum("impl", "auto", ["auto", "xla", "pallas_tpu", "pallas_gpu"],
                          "quantized_matmul implementation.")
_SAVE = flags.DEFINE_bool("save", True, "Write the quantized run directories.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output checkpoints.")


def _run():
  init_from = _CONFIG.value.model.get("init_from")
  out_dir = _OUT_DIR.value or (f"runs/{_CONFIG.value.name}_hf_quant" if init_from else None)
  source = runs.load_source(init_from or _WORKDIR.value, _STEP.value,
                            run_config=_CONFIG.value if init_from else None)
  result = quantize.quantize_run(
      source, _FORMATS.value, out_dir=out_dir, keep_float=_KEEP_FLOAT.value, eval_windows=_EVAL_WINDOWS.value,
      batch_size=_BATCH.value, impl=_IMPL.value, save=_SAVE.value,
      overwrite=_OVERWRITE.value,
      log=lambda line: print(line, flush=True))
  path = metrics.write_json(result, _JSON.value or f"{result['out_dir']}/quantize.json")
  ev = result["eval"]
  print(f"{result['source']} step {result['step']} on {result['machine']}; held-out bpb over "
        f"{ev['windows']} windows of {ev['seq_len']}; JSON: {path}")


if __name__ == "__main__":
  config_lib.launch(_run)
