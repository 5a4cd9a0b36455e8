"""benchmarks/accel.sh, the accelerator run: its dry run on this CPU, its steps'
commands for the device, how it reads a step's results, and which kernel
tests the GPU run selects and skips (tests/conftest.py)."""

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import accel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ctx(tmp_path, dry_run=False):
  return accel.Ctx(dry_run=dry_run, results=str(tmp_path), scratch=str(tmp_path),
                   python=sys.executable, env={}, test_paths=["tests/ops"], xdist_workers=4)


def test_device_commands_compile_the_gpu_kernels(tmp_path):
  argv, env, why_not = accel.command(_ctx(tmp_path), "kernel_tests")
  assert why_not is None
  assert env["GEMKIT_INTERPRET"] == "0"                 # compiled, never interpreted
  assert argv[argv.index("-m", 3) + 1] == "pallas_gpu or pallas_tpu"   # tpu: skipped with reason
  assert "--kernel-target=gpu" not in argv              # the backend decides on the device
  argv, env, _ = accel.command(_ctx(tmp_path, dry_run=True), "kernel_tests")
  assert "--kernel-target=gpu" in argv and env["GEMKIT_INTERPRET"] == ""
  for step in ("quant_matmul", "scan", "attention"):
    device, _, _ = accel.command(_ctx(tmp_path), step)
    dry, _, _ = accel.command(_ctx(tmp_path, dry_run=True), step)
    assert "--kernel=pallas_gpu" in dry and not any(a.startswith("--kernel=") for a in device)
  assert accel.BUDGET_S < 8 * 60 and accel.STEP_NAMES[-1] == "train_step"


def test_a_missing_train_step_is_reported_not_run(tmp_path, monkeypatch):
  monkeypatch.setattr(accel, "ROOT", str(tmp_path))
  argv, _, why_not = accel.command(_ctx(tmp_path), "train_step")
  assert argv is None and why_not.startswith("missing")


def test_test_results_are_read_from_the_stream(tmp_path):
  path = tmp_path / "kernel_tests.jsonl"
  lines = [dict(nodeid="a", when="call", outcome="passed", seconds=1.0, message=""),
           dict(nodeid="b", when="setup", outcome="skipped", seconds=0.0, message="tpu only"),
           dict(nodeid="c", when="call", outcome="failed", seconds=2.0, message="x\nboom"),
           dict(nodeid="d.py", when="collect", outcome="error", seconds=0.0, message="no chex")]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  status, result = accel.summarize(_ctx(tmp_path), "kernel_tests", 1, False)
  assert status == "failed"
  assert result["counts"] == dict(passed=1, skipped=1, failed=1, error=1)
  assert [f["nodeid"] for f in result["failures"]] == ["c", "d.py"]
  assert result["skip_reasons"] == {"tpu only": 1}
  assert accel.summarize(_ctx(tmp_path), "kernel_tests", None, True)[0] == "timeout"
  path.write_text(json.dumps(lines[0]) + "\n")
  assert accel.summarize(_ctx(tmp_path), "kernel_tests", 0, False)[0] == "ok"


def test_a_benchmark_row_with_an_error_makes_the_step_partial(tmp_path):
  (tmp_path / "scan.json").write_text(json.dumps(dict(rows=[
      dict(path="xla", fwd_ms=1.0), dict(path="pallas_gpu", error="CompileError: no")])))
  status, result = accel.summarize(_ctx(tmp_path), "scan", 0, False)
  assert status == "partial" and result["row_errors"] == 1
  assert accel.summarize(_ctx(tmp_path), "attention", 1, False)[0] == "failed"   # no file


def test_gpu_run_selects_every_gpu_kernel_test_and_skips_tpu_ones():
  """The selection the device run makes, collected here (nothing runs)."""
  r = subprocess.run(
      [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
       "-o", "addopts=", "--kernel-target=gpu", "-m", "pallas_gpu", "tests/ops"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
  for name in ("test_gpu_kernel_matches_float64", "test_triton_kernel[",
               "test_linear_scan_shapes[pallas_gpu", "test_delta_kernels_match_float64[pallas_gpu",
               "test_quantized_matmul_ragged[", "test_attention_gpu_kernel_head_dim_128"):
    assert any(name in i for i in ids), name
  assert not any("pallas_tpu" in i or "race" in i or "test_tpu_" in i for i in ids)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"   # a killed child may linger as a zombie
  except (ProcessLookupError, FileNotFoundError):
    return False


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
  pid_file = tmp_path / "child"
  with open(tmp_path / "log", "w+") as log:
    rc, timed_out, seconds = accel.run_step(
        ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], dict(os.environ), log,
        timeout_s=2)
  assert timed_out and rc is not None and seconds < 20
  child = int(pid_file.read_text())
  deadline = time.monotonic() + 5
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(child)


def test_compiled_kernels_need_a_device():
  """GEMKIT_INTERPRET=0 on a CPU is a usage error that says what to use instead."""
  r = subprocess.run(
      [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
       "tests/ops/test_config.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False, env=dict(os.environ, GEMKIT_INTERPRET="0", JAX_PLATFORMS="cpu"))
  assert r.returncode != 0
  assert "--kernel-target=gpu" in r.stdout + r.stderr


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
  """``accel.sh --dry-run``: every step ok (about 1 minute on 2 cores for the
  kernel steps, plus train_step.py's own --dry-run)."""
  r = subprocess.run(["bash", "benchmarks/accel.sh", "--dry-run", f"--out={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                     env=dict(os.environ, OUT=""))
  report = json.loads((tmp_path / "accel.json").read_text())
  statuses = {name: step["status"] for name, step in report["steps"].items()}
  expected = {name: "ok" for name in accel.STEP_NAMES}
  if not os.path.exists(os.path.join(ROOT, "benchmarks", "train_step.py")):
    expected["train_step"] = "missing"
  assert statuses == expected, r.stdout[-3000:]
  assert r.returncode == 0
  assert report["dry_run"] and report["device_kind"] and report["jax"]
  tests = report["steps"]["kernel_tests"]["result"]
  assert tests["counts"].get("passed", 0) > 0 and not tests["failures"]
  assert any("compiles only for a TPU" in reason for reason in tests["skip_reasons"])
  for name in ("quant_matmul", "scan", "attention"):
    result = report["steps"][name]["result"]
    assert result["rows"] > 0 and result["row_errors"] == 0, name
    impls = json.dumps(result["data"])
    assert "pallas_gpu" in impls, name      # the GPU kernel's code path ran (interpreted)
  assert sorted(os.listdir(tmp_path)) == ["accel.json", "accel.log", "results"]
  assert len(os.listdir(tmp_path / "results")) <= 6   # 8 files come back from the device
  assert "accelerator run" in r.stdout and "kernel_tests" in r.stdout
