"""The accelerator run: compiled kernel tests and the benchmarks, one JSON, one table.

``bash benchmarks/accel.sh`` calls this (see the "Accelerator run" section of
benchmarks/README.md for the device command). In order, each step in its own
process with its own time limit, inside one overall budget (default 465 s, so
the whole run stays under 8 minutes on one H100/H200):

1. ``env``: Python, jax and the device (``jax.devices()``), the versions of
   the packages the steps need (each missing one is named, with the steps it
   stops), ``import ops`` on this jax, ``nvidia-smi``.
2. ``kernel_tests``: every Pallas kernel's correctness tests (tests/ops, the
   tests marked with the device's kernel family, ``-m pallas_gpu``) with
   ``GEMKIT_INTERPRET=0``: the kernels compile for the device, nothing is
   interpreted, pallas_tpu tests are skipped with the reason
   (tests/conftest.py). Each outcome is streamed to a JSON-lines file, so a
   step stopped at its limit still reports what ran.
3. ``quant_matmul``, ``scan``, ``attention``: benchmarks/quant_matmul.py,
   the accelerator sections of benchmarks/scan.py and benchmarks/attention.py.
4. ``train_step``: ``benchmarks/train_step.py --out ...`` when that file
   exists (else the step is "missing").

``--dry-run`` goes through the same steps on a CPU: kernels interpreted
(``--kernel-target=gpu`` selects and skips the tests as the GPU run does),
benchmarks at tiny sizes with the GPU kernel interpreted, ``train_step.py
--dry-run``; about a minute on 2 cores (tests/test_accel.py runs it).

Output (``--out DIR``, default ``$OUT`` when set, else
``runs/accel``): ``accel.json`` (rewritten after every
step, so that a run cut short keeps what it measured), ``accel.log`` (every
step's output) and ``results/`` (each step's own JSON). That is 7 files, inside
the device tool's limit of 8 files coming back from ``$OUT``.

This process never imports jax (a process holding the GPU would starve the
steps): the steps do.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Python packages each step needs (import names); the env step reports each one missing.
NEEDS = {
    "kernel_tests": ("jax", "numpy", "pytest", "chex", "ml_dtypes"),
    "quant_matmul": ("jax", "numpy"),
    "scan": ("jax", "numpy"),
    "attention": ("jax", "numpy"),
    "train_step": ("jax", "numpy", "flax", "optax", "orbax.checkpoint", "ml_collections",
                   "grain", "absl", "recurrentgemma", "torch"),
}
# Distributions whose versions the env step records.
DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                 "jax-cuda12-pjrt", "numpy", "ml_dtypes", "pytest", "pytest-xdist",
                 "pytest-timeout", "chex", "flax", "optax", "orbax-checkpoint", "absl-py",
                 "ml_collections", "grain", "array_record", "recurrentgemma", "torch", "triton")


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  cap_s: float      # its time limit on the device
  floor_s: float    # kept back for it while earlier steps run
  cap_dry_s: float  # its time limit in --dry-run


STEPS = (
    Step("env", 60, 15, 60),
    Step("kernel_tests", 170, 30, 150),
    Step("quant_matmul", 80, 20, 90),
    Step("scan", 55, 20, 90),
    Step("attention", 55, 20, 90),
    Step("train_step", 300, 60, 240),   # last: what is left (12 child processes on a GPU)
)
STEP_NAMES = tuple(s.name for s in STEPS)
BUDGET_S = 465.0   # all steps together: the run stays under 8 minutes


# ----------------------------------------------------------------------------- env probe

def env_probe(out: str) -> None:
  """Runs in the env step's own process: writes what it finds to ``out``."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  found: dict[str, Any] = dict(python=sys.version.split()[0], executable=sys.executable,
                               platform=platform.platform(), cpu_count=os.cpu_count())
  versions = {}
  for dist in DISTRIBUTIONS:
    try:
      versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
      versions[dist] = None
  found["versions"] = versions
  modules = sorted({m for needs in NEEDS.values() for m in needs})
  found["missing"] = {m: [s for s, needs in NEEDS.items() if m in needs]
                      for m in modules if not _has(m)}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    found.update(jax=jax.__version__, backend=jax.default_backend(),
                 device_kind=devices[0].device_kind, device_count=len(devices),
                 devices=[str(d) for d in devices])
    try:
      stats = devices[0].memory_stats() or {}
      found["device_memory_bytes"] = stats.get("bytes_limit")
    except Exception:  # pylint: disable=broad-except
      pass
  except Exception as e:  # pylint: disable=broad-except
    found["jax_error"] = f"{type(e).__name__}: {e}"
  try:   # the ops on this jax (API changes between jax versions show here first)
    import ops.attention, ops.quant, ops.scan  # pylint: disable=g-import-not-at-top,unused-import,multiple-imports
    from jax.experimental.pallas import triton  # pylint: disable=g-import-not-at-top,unused-import
    found["ops_import"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    found["ops_import"] = f"{type(e).__name__}: {e}"
  if shutil.which("nvidia-smi"):
    q = ("name,driver_version,memory.total,compute_mode,clocks.sm,clocks.max.sm,"
         "temperature.gpu,power.draw")
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30, check=False)
    found["nvidia_smi"] = (r.stdout or r.stderr).strip()
  with open(out, "w") as f:
    json.dump(found, f, indent=1)
  print(json.dumps(found, indent=1))
  if "jax_error" in found:
    sys.exit(1)


def _has(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


# ----------------------------------------------------------------------------- the steps

@dataclasses.dataclass
class Ctx:
  dry_run: bool
  results: str           # folder of each step's JSON
  scratch: str           # a temporary folder
  python: str
  env: dict
  test_paths: list
  xdist_workers: int


def _result_file(ctx: Ctx, step: str) -> str:
  if step == "env":   # embedded in accel.json; kept out of $OUT (8 files come back at most)
    return os.path.join(ctx.scratch, "env.json")
  return os.path.join(ctx.results, f"{step}.jsonl" if step == "kernel_tests" else f"{step}.json")


def command(ctx: Ctx, step: str) -> tuple[list[str] | None, dict, str | None]:
  """(argv, extra environment, why not) of one step."""
  py, out = ctx.python, _result_file(ctx, step)
  if step == "env":
    return [py, os.path.join(ROOT, "benchmarks", "accel.py"), "--env-probe", out], {}, None
  if step == "kernel_tests":
    if not _has("pytest"):
      # The test modules import pytest, so there is no lesser way to run them.
      return None, {}, ("pytest is not installed here: the kernel tests cannot run; "
                        "quant_matmul's rel_err column is the only kernel check left")
    argv = [py, "-m", "pytest", *ctx.test_paths, "-q", "-p", "no:cacheprovider", "--tb=short",
            "-o", "addopts=", "--continue-on-collection-errors", f"--report-jsonl={out}",
            # jax 0.11 warns at every Triton lowering that the backend is deprecated
            "-W", "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"]
    if ctx.dry_run:
      # Kernels interpreted; selected and skipped as on the GPU.
      return argv + ["--kernel-target=gpu", "-m", "(pallas_gpu or pallas_tpu) and not slow"], {
          "GEMKIT_INTERPRET": ""}, None
    if _has("pytest_timeout"):
      argv.append("--timeout=150")   # one hung compile does not take the whole step
    if ctx.xdist_workers > 1 and _has("xdist"):
      argv += ["-n", str(ctx.xdist_workers)]
    # Compiled, nothing interpreted; pallas_tpu tests are collected to be skipped with the
    # reason; several workers share the GPU, so no preallocation.
    return argv + ["-m", "pallas_gpu or pallas_tpu"], {"GEMKIT_INTERPRET": "0",
                                         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, None
  bench = lambda name: [py, os.path.join(ROOT, "benchmarks", f"{name}.py"), f"--out={out}"]
  if step == "quant_matmul":
    if ctx.dry_run:
      return bench(step) + ["--m=1,3", "--k=256", "--n=256", "--iters=1",
                            "--formats=int8,int4-g128,nf4-g64,w8a8-int8", "--peak_gbps=",
                            "--kernel=pallas_gpu", "--kernel_check=0"], {}, None
    # The targets are at M <= 16 and M = 1024 (each M compiles every format anew).
    return bench(step) + ["--m=1,16,1024", "--k=4096", "--n=4096", "--iters=20"], {}, None
  if step == "scan":
    if ctx.dry_run:
      return bench(step) + ["--sections=accel", "--tiny", "--iters=1",
                            "--kernel=pallas_gpu"], {}, None
    return bench(step) + ["--sections=accel", "--iters=5"], {}, None
  if step == "attention":
    if ctx.dry_run:
      return bench(step) + ["--sections=accel", "--accel_t=256", "--window=64", "--heads=2",
                            "--kv_heads=1", "--head_dim=32", "--iters=1",
                            "--kernel=pallas_gpu"], {}, None
    return bench(step) + ["--sections=accel", "--iters=5"], {}, None
  if step == "train_step":
    script = os.path.join(ROOT, "benchmarks", "train_step.py")
    if not os.path.exists(script):
      return None, {}, "missing: benchmarks/train_step.py does not exist"
    return [py, script, f"--out={out}"] + (["--dry-run"] if ctx.dry_run else []), {}, None
  raise ValueError(f"unknown step {step!r}")


def summarize(ctx: Ctx, step: str, rc: int | None, timed_out: bool) -> tuple[str, dict]:
  """(status, result) of a finished step from its files and exit code."""
  out = _result_file(ctx, step)
  if step == "kernel_tests":
    return _summarize_tests(out, rc, timed_out)
  data = None
  if os.path.exists(out):
    try:
      with open(out) as f:
        data = json.load(f)
    except ValueError as e:
      data = {"unreadable": str(e)}
  status = "timeout" if timed_out else ("ok" if rc == 0 and data is not None else "failed")
  if step == "env":
    return ("ok" if status == "ok" and data.get("ops_import") == "ok" else
            ("failed" if status == "ok" else status)), data or {}
  rows = _rows(data)
  errors = [r for r in rows if isinstance(r, dict) and (
      "error" in r or str(r.get("note", "")).startswith("error"))]
  if status == "ok" and errors:
    status = "partial"
  return status, dict(rows=len(rows), row_errors=len(errors),
                      first_errors=[r.get("error") or r.get("note") for r in errors[:5]],
                      data=data)


def _rows(data) -> list:
  if not isinstance(data, dict):
    return []
  rows = data.get("rows")
  return rows if isinstance(rows, list) else []


def _summarize_tests(path: str, rc, timed_out) -> tuple[str, dict]:
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:   # the last line of a run stopped while writing it
          pass
  counts: dict[str, int] = {}
  for r in records:
    key = "error" if r["when"] != "call" and r["outcome"] == "failed" else r["outcome"]
    counts[key] = counts.get(key, 0) + 1
  failures = [dict(nodeid=r["nodeid"], when=r["when"], message=r["message"][-600:])
              for r in records if r["outcome"] in ("failed", "error")]
  skips: dict[str, int] = {}
  for r in records:
    if r["outcome"] == "skipped":
      skips[r["message"]] = skips.get(r["message"], 0) + 1
  if timed_out:
    status = "timeout"
  elif failures:
    status = "failed"
  elif rc == 0 and counts.get("passed"):
    status = "ok"
  else:
    status = "failed"
  return status, dict(counts=counts, failures=failures, skip_reasons=skips,
                      seconds_by_test=sorted(((r["seconds"], r["nodeid"]) for r in records
                                              if r["when"] == "call"), reverse=True)[:10])


# ----------------------------------------------------------------------------- running

def run_step(argv, env, log, timeout_s: float) -> tuple[int | None, bool, float]:
  """Runs ``argv`` in its own process group; (exit code, timed out, seconds)."""
  start = time.monotonic()
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    rc = proc.wait(timeout=max(timeout_s, 1))
    return rc, False, time.monotonic() - start
  except subprocess.TimeoutExpired:
    for sig in (signal.SIGTERM, signal.SIGKILL):   # the step and everything it started
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        break
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
    return proc.returncode, True, time.monotonic() - start


def write_report(path: str, report: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, path)


def _one_line(step: str, status: str, result: dict) -> str:
  if step == "env":
    if not result:
      return ""
    missing = ", ".join(f"{m} ({'/'.join(s)})" for m, s in result.get("missing", {}).items())
    return (f"jax {result.get('jax')} python {result.get('python')} on "
            f"{result.get('device_kind')} x{result.get('device_count')}; ops import: "
            f"{result.get('ops_import')}" + (f"; missing: {missing}" if missing else ""))
  if step == "kernel_tests":
    counts = result.get("counts", {})
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test reported"
  if "reason" in result:
    return result["reason"]
  line = f"{result.get('rows', 0)} rows"
  if result.get("row_errors"):
    line += f", {result['row_errors']} with errors: {result['first_errors'][0]}"
  return line


def print_table(report: dict) -> None:
  print(f"\n# accelerator run: {report['device_kind']} ({report['backend']}), jax "
        f"{report['jax']}, python {report['python']}, {'DRY RUN' if report['dry_run'] else ''}"
        f" total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget")
  print(f"{'step':<13} {'status':<8} {'seconds':>7}  result")
  for name in STEP_NAMES:
    s = report["steps"][name]
    print(f"{name:<13} {s['status']:<8} {s.get('seconds', 0):>7.1f}  {s.get('line', '')}"[:300])
  tests = report["steps"]["kernel_tests"].get("result", {})
  for f in tests.get("failures", [])[:15]:
    last = [ln for ln in f["message"].splitlines() if ln.strip()][-1:] or [""]
    print(f"  FAILED {f['nodeid']}: {last[0][:200]}")
  for reason, n in list(tests.get("skip_reasons", {}).items())[:5]:
    print(f"  skipped {n}: {reason[:160]}")


def _default_out() -> str:
  if os.environ.get("OUT"):
    return os.environ["OUT"]
  return os.path.join(ROOT, "runs", "accel")   # runs/ is git-ignored


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dry-run", action="store_true",
                 help="on a CPU: the same steps, tiny sizes, kernels interpreted")
  p.add_argument("--out", default=None, help="output folder (default $OUT, else runs/accel)")
  p.add_argument("--budget", type=float, default=BUDGET_S,
                 help=f"seconds for all steps together (default {BUDGET_S:.0f}: under 8 minutes)")
  p.add_argument("--steps", default=",".join(STEP_NAMES),
                 help=f"comma list, a subset of {','.join(STEP_NAMES)}")
  p.add_argument("--tests", default=None,
                 help="test paths for kernel_tests (default tests/ops; --dry-run: "
                      "tests/ops/test_scan.py)")
  p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                 help="pytest-xdist workers for kernel_tests on the device, compiling in "
                      "parallel (default: half the CPUs, at most 8; 1: none)")
  p.add_argument("--env-probe", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.env_probe:
    env_probe(args.env_probe)
    return 0
  chosen = args.steps.split(",")
  unknown = set(chosen) - set(STEP_NAMES)
  if unknown:
    p.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEP_NAMES)}")
  out = os.path.abspath(args.out or _default_out())
  results = os.path.join(out, "results")
  os.makedirs(results, exist_ok=True)
  for name in STEP_NAMES:   # no stale result is read as this run's
    path = os.path.join(results, f"{name}.jsonl" if name == "kernel_tests" else f"{name}.json")
    if os.path.exists(path):
      os.remove(path)
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  tests = (args.tests.split(",") if args.tests else
           ["tests/ops/test_scan.py"] if args.dry_run else ["tests/ops"])
  ctx = Ctx(dry_run=args.dry_run, results=results, scratch=tempfile.mkdtemp(prefix="accel-"),
            python=sys.executable, env=env, test_paths=tests, xdist_workers=args.workers)
  report: dict[str, Any] = dict(
      dry_run=args.dry_run, budget_s=args.budget, started=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()),
      python=platform.python_version(), jax=None, backend=None, device_kind=None,
      command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), seconds=0.0,
      steps={name: dict(status="pending" if name in chosen else "not asked")
             for name in STEP_NAMES})
  report_path, log_path = os.path.join(out, "accel.json"), os.path.join(out, "accel.log")
  start = time.monotonic()
  deadline = start + args.budget
  write_report(report_path, report)
  with open(log_path, "w") as log:
    for i, step in enumerate(STEPS):
      if step.name not in chosen:
        continue
      entry = report["steps"][step.name]
      argv_, extra, why_not = command(ctx, step.name)
      if argv_ is None:
        entry.update(status="missing", result=dict(reason=why_not), line=why_not)
        write_report(report_path, report)
        continue
      later = sum(s.floor_s for s in STEPS[i + 1:] if s.name in chosen)
      limit = min(step.cap_dry_s if args.dry_run else step.cap_s,
                  deadline - time.monotonic() - later)
      if limit < 5:
        entry.update(status="no time", line="the budget ran out before this step")
        write_report(report_path, report)
        continue
      step_env = dict(env, **extra)
      if step_env.get("GEMKIT_INTERPRET") == "":
        del step_env["GEMKIT_INTERPRET"]
      entry.update(status="running", argv=argv_[1:], limit_s=round(limit, 1),
                   env={k: v for k, v in extra.items() if v})
      write_report(report_path, report)
      print(f"[accel] {step.name}: {' '.join(argv_[1:])} (limit {limit:.0f} s)", flush=True)
      log.write(f"\n===== {step.name}: {' '.join(argv_)}\n")
      log.flush()
      begin = log.tell()
      rc, timed_out, seconds = run_step(argv_, step_env, log, limit)
      log.flush()
      status, result = summarize(ctx, step.name, rc, timed_out)
      entry.update(status=status, exit_code=rc, seconds=round(seconds, 1), result=result,
                   line=_one_line(step.name, status, result))
      if status != "ok":   # what it printed last (a benchmark cut short printed its rows)
        with open(log_path, errors="replace") as f:
          f.seek(begin)
          entry["log_tail"] = f.read().splitlines()[-60:]
      if step.name == "env" and result:
        report.update(jax=result.get("jax"), backend=result.get("backend"),
                      device_kind=result.get("device_kind"), python=result.get("python"))
        if "exclusive" in str(result.get("nvidia_smi", "")).lower():
          ctx.xdist_workers = 1   # one process per GPU: the test workers could not share it
      report["seconds"] = round(time.monotonic() - start, 1)
      write_report(report_path, report)
      print(f"[accel] {step.name}: {status} in {seconds:.0f} s  {entry['line'][:200]}",
            flush=True)
  report["seconds"] = round(time.monotonic() - start, 1)
  write_report(report_path, report)
  print_table(report)
  print(f"\nwrote {report_path} and {log_path}")
  bad = [n for n in chosen if report["steps"][n]["status"] != "ok"
         and (n, report["steps"][n]["status"]) != ("train_step", "missing")]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
