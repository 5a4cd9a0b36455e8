"""Loading a Hugging Face checkpoint: gemkit.hf vs transformers, time and memory.

A random Qwen2 model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings, q/k/v bias:
494M parameters) is built with transformers on the ``meta`` device, filled
with random values in bfloat16 and saved with ``save_pretrained`` as sharded
bf16 safetensors with an index, in ``--dir`` (reused when it is complete).
``--small`` uses a ~20M-parameter model of the same family instead.

Each loader then runs in its own fresh process (so peak RSS is that
loader's), ``--repeats`` times, one process after another, the loaders
interleaved within each repeat:

- ``gemkit``: ``gemkit.hf.convert.load_weights(model_config(dir, dtype=...), dir)``
  and ``jax.block_until_ready`` on the parameters; ``dtype`` the file's
  (bfloat16) or float32;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir)`` with its
  default dtype handling (``"auto"``: the file's bfloat16) or with
  ``dtype=torch.float32``.

Reported per loader and dtype: ``load s``, the wall time from the call to a
loaded model (median and min over the repeats); ``first touch s``, then
reading one byte of every 4 KiB page of every parameter (transformers keeps
bf16 parameters of a bf16 file as memory-mapped views, so its load reads no
data: the pages come in on first use); ``process s``, the whole process
(interpreter start, imports, load, touch, exit) measured by the parent
(median); ``import s``; ``RSS before``, the process's RSS after its imports
(jax's CPU backend started for gemkit); the peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) at the end of the load and after the
touch (it counts the resident pages of memory-mapped safetensors files as
well as the process's own memory); the anonymous and file-backed RSS after
the touch (``/proc/self/status``), the model still alive; and the parameter
bytes of the loaded model. The files are read once before the first process,
so every load starts from a warm page cache. The JSON also holds each
process's numbers, the anonymous / file RSS at the end of the load, the git
commit and the load average at start and end. JSON:
``benchmarks/results/hf_load_<machine>.json`` (``--out`` to change;
``--small`` writes ``hf_load_small_<machine>.json``).

  python benchmarks/hf_load.py                 # 0.5B, 3 repeats (about 70 s on 2 cores)
  python benchmarks/hf_load.py --small --repeats=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Qwen2.5-0.5B's shape, and a ~20M-parameter model of the same family.
SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 bos_token_id=151643, eos_token_id=151643),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=1024, vocab_size=32000),
}
COMMON = dict(tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, use_sliding_window=False)
SHARD_SIZE = {"0.5b": "200MB", "small": "20MB"}
LOADERS = (("gemkit", "bfloat16"), ("gemkit", "float32"),
           ("transformers", "default"), ("transformers", "float32"))
DONE = "hf_load_benchmark.done"   # written last: the directory is complete


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _memory() -> dict:
  import resource  # pylint: disable=g-import-not-at-top
  return dict(rss_mb=_status_kb("VmRSS") / 1024, rss_anon_mb=_status_kb("RssAnon") / 1024,
              rss_file_mb=_status_kb("RssFile") / 1024,
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# --- the checkpoint -------------------------------------------------------------


def create(directory: str, size: str) -> None:
  """Builds the random model on the meta device, fills it and saves it as bf16."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  cfg = transformers.Qwen2Config(**SHAPES[size], **COMMON)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
  model.to_empty(device="cpu")
  model.tie_weights()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():   # tied: the embedding once
      if "norm" in name:
        p.fill_(1.0)
      else:
        p.normal_(0.0, 0.02, generator=gen)
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  n = sum(p.numel() for p in model.parameters())
  model.save_pretrained(directory, max_shard_size=SHARD_SIZE[size])
  with open(os.path.join(directory, DONE), "w") as f:
    json.dump({"size": size, "params": n, "seconds": time.perf_counter() - start}, f)


def ensure_checkpoint(directory: str, size: str) -> dict:
  marker = os.path.join(directory, DONE)
  if os.path.isfile(marker):
    with open(marker) as f:
      info = json.load(f)
    if info["size"] != size:
      raise SystemExit(f"{directory} holds the {info['size']!r} model, not {size!r}; "
                       "pass another --dir")
    info["created"] = False
  else:
    print(f"creating the {size} model in {directory} ...", flush=True)
    os.makedirs(directory, exist_ok=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker=create",
                    f"--dir={directory}", f"--size={size}"], check=True)
    with open(marker) as f:
      info = json.load(f)
    info["created"] = True
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  info["files"] = len(files)
  info["file_bytes"] = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
  return info


def warm_page_cache(directory: str) -> None:
  for f in sorted(os.listdir(directory)):
    with open(os.path.join(directory, f), "rb") as fh:
      while fh.read(64 << 20):
        pass


# --- one load, in its own process ------------------------------------------------


PAGE = 4096


def load_gemkit(directory: str, dtype: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemkit.hf import convert  # pylint: disable=g-import-not-at-top
  jax.devices()                                  # start the backend before measuring
  imported, before = time.perf_counter(), _memory()
  model = convert.load_weights(convert.model_config(directory, dtype=dtype), directory)
  jax.block_until_ready(nnx.state(model))
  loaded, at_load = time.perf_counter(), _memory()
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  if jax.default_backend() == "cpu":             # a byte of every page (already in memory)
    for x in leaves:
      int(np.asarray(x).reshape(-1).view(np.uint8)[::PAGE].sum())
  touched = time.perf_counter()
  return dict(imported=imported, before=before, loaded=loaded, at_load=at_load,
              touched=touched, backend=jax.default_backend(), model=model,
              params=sum(x.size for x in leaves), param_bytes=sum(x.nbytes for x in leaves),
              param_dtypes=sorted({str(x.dtype) for x in leaves}))


def load_transformers(directory: str, dtype: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kw = {} if dtype == "default" else {"dtype": getattr(torch, dtype)}
  imported, before = time.perf_counter(), _memory()
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kw)
  loaded, at_load = time.perf_counter(), _memory()
  params = list(model.parameters())              # tied: the embedding once
  with torch.no_grad():   # a byte of every page: faults in what is still only mapped
    for p in params:
      int(p.detach().reshape(-1).view(torch.uint8)[::PAGE].sum())
  touched = time.perf_counter()
  return dict(imported=imported, before=before, loaded=loaded, at_load=at_load,
              touched=touched, backend="torch-cpu", model=model,
              params=sum(p.numel() for p in params),
              param_bytes=sum(p.numel() * p.element_size() for p in params),
              param_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in params}),
              torch_threads=torch.get_num_threads())


def worker(loader: str, directory: str, dtype: str) -> None:
  """One load in this process; prints its measurements as a ``RESULT {json}`` line."""
  r = (load_gemkit if loader == "gemkit" else load_transformers)(directory, dtype)
  after = _memory()                              # the model is still alive here
  del r["model"]
  imported, before, at_load = r.pop("imported"), r.pop("before"), r.pop("at_load")
  loaded, touched = r.pop("loaded"), r.pop("touched")
  r.update(import_s=imported - _START, load_s=loaded - imported, touch_s=touched - loaded,
           rss_before_mb=before["rss_mb"], peak_rss_load_mb=at_load["peak_rss_mb"],
           rss_anon_load_mb=at_load["rss_anon_mb"], rss_file_load_mb=at_load["rss_file_mb"],
           peak_rss_mb=after["peak_rss_mb"], rss_after_mb=after["rss_mb"],
           rss_anon_after_mb=after["rss_anon_mb"], rss_file_after_mb=after["rss_file_mb"])
  print("RESULT " + json.dumps(r), flush=True)


def run_one(loader: str, dtype: str, directory: str) -> dict:
  start = time.perf_counter()
  p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={loader}",
                      f"--dtype={dtype}", f"--dir={directory}"], cwd=REPO,
                     capture_output=True, text=True)
  process_s = time.perf_counter() - start
  if p.returncode:
    raise SystemExit(f"{loader} {dtype} failed:\n{p.stderr[-4000:]}")
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return dict(json.loads(line[len("RESULT "):]), process_s=process_s)


# --- the parent -------------------------------------------------------------------


def run(args) -> dict:
  sys.path.insert(0, REPO)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  size = "small" if args.small else "0.5b"
  directory = args.dir or f"/tmp/gemkit_hf_load/qwen2-{size}-random-bf16"
  load_start = os.getloadavg()
  ckpt = ensure_checkpoint(directory, size)
  warm_page_cache(directory)
  runs = {f"{l}/{d}": [] for l, d in LOADERS}
  for i in range(args.repeats):
    for loader, dtype in LOADERS:
      r = run_one(loader, dtype, directory)
      runs[f"{loader}/{dtype}"].append(r)
      print(f"  repeat {i + 1}/{args.repeats} {loader:<12} {dtype:<8} load {r['load_s']:6.2f} s  "
            f"touch {r['touch_s']:5.2f} s  process {r['process_s']:6.2f} s  "
            f"peak RSS {r['peak_rss_load_mb']:6.0f} / {r['peak_rss_mb']:6.0f} MB", flush=True)
  rows = []
  for loader, dtype in LOADERS:
    rs = runs[f"{loader}/{dtype}"]
    med = lambda k, rs=rs: statistics.median(r[k] for r in rs)
    rows.append(dict(
        loader=loader, dtype=dtype, param_dtypes=rs[0]["param_dtypes"], params=rs[0]["params"],
        param_mb=rs[0]["param_bytes"] / 2**20, load_s=med("load_s"),
        load_s_min=min(r["load_s"] for r in rs), touch_s=med("touch_s"),
        process_s=med("process_s"), import_s=med("import_s"),
        rss_before_mb=med("rss_before_mb"), peak_rss_load_mb=med("peak_rss_load_mb"),
        rss_anon_load_mb=med("rss_anon_load_mb"), rss_file_load_mb=med("rss_file_load_mb"),
        peak_rss_mb=med("peak_rss_mb"), rss_anon_after_mb=med("rss_anon_after_mb"),
        rss_file_after_mb=med("rss_file_after_mb"),
        backend=rs[0]["backend"], runs=rs))
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip()
  return dict(
      benchmark="hf_load", machine=common.machine(), cpu_count=os.cpu_count(),
      jax_version=jax.__version__, torch_version=torch.__version__,
      transformers_version=transformers.__version__, size=size,
      git_commit=git("rev-parse", "HEAD"),
      gemkit_hf_uncommitted_changes=bool(git("status", "--porcelain", "gemkit/hf")),
      model=dict(SHAPES[size], **COMMON), checkpoint=dict(ckpt, dir=directory),
      repeats=args.repeats, page_cache="warm (files read once before the first process)",
      load_avg_at_start=list(load_start), load_avg_at_end=list(os.getloadavg()),
      command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), rows=rows), common


def print_table(result: dict) -> None:
  ck = result["checkpoint"]
  print(f"\n# {result['machine']}, {result['size']} model: {ck['params'] / 1e6:.1f}M parameters, "
        f"{ck['files']} safetensors files, {ck['file_bytes'] / 2**20:.0f} MiB on disk; "
        f"median of {result['repeats']} processes each; load average at start "
        f"{result['load_avg_at_start'][0]:.2f}")
  print("| loader | dtype | load s (med / min) | first touch s | process s | import s "
        "| RSS before MB | peak RSS at load MB | peak RSS after touch MB "
        "| anon / file RSS after touch MB | params MB |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in result["rows"]:
    dtype = r["dtype"] if r["dtype"] != "default" else f"default ({','.join(r['param_dtypes'])})"
    print(f"| {r['loader']} | {dtype} | {r['load_s']:.2f} / {r['load_s_min']:.2f} | "
          f"{r['touch_s']:.2f} | {r['process_s']:.2f} | {r['import_s']:.2f} | "
          f"{r['rss_before_mb']:.0f} | {r['peak_rss_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
          f"{r['rss_anon_after_mb']:.0f} / {r['rss_file_after_mb']:.0f} | {r['param_mb']:.0f} |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dir", default=None,
                 help="checkpoint directory (created if absent; default "
                      "/tmp/gemkit_hf_load/qwen2-<size>-random-bf16)")
  p.add_argument("--small", action="store_true", help="a ~20M-parameter model (a dry run)")
  p.add_argument("--repeats", type=int, default=3, help="processes per loader and dtype")
  p.add_argument("--out", default=None, help="JSON path (default "
                 "benchmarks/results/hf_load_<machine>.json; _small with --small)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
  p.add_argument("--size", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker == "create":
    create(args.dir, args.size)
    return
  if args.worker:
    sys.path.insert(0, REPO)
    worker(args.worker, args.dir, args.dtype)
    return
  result, common = run(args)
  print_table(result)
  name = "hf_load_small" if args.small else "hf_load"
  print(f"\nwrote {common.write_json(result, name, args.out)}")


if __name__ == "__main__":
  main()
