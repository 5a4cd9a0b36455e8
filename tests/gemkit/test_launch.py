"""The launcher end to end: config errors are one clear line; SIGKILL then resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import TINY, latest_params, write_corpus

REPO = pathlib.Path(__file__).resolve().parents[2]


def _train_args(workdir, corpus, **extra):
  values = {**TINY, "data.source": "text", "data.path": corpus, "data.heldout_fraction": 0.1,
            **extra}
  return ([sys.executable, "-m", "launch.train", "--config=experiments/lm_tiny.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()])


def _run(args, timeout=300):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("override,message", [
    ("--config.train.stepz=3", "config error: train.stepz: unknown config key"),
    ("--config.trian.steps=3", "config error: trian.steps: unknown config key"),
    ("--config.train.steps=abc", "--config.train.steps=abc: invalid literal for int()"),
    ("--config.model.num_kv_heads=3",
     "config error: model.num_kv_heads: must divide num_heads=2, got 3"),
    ("--config.data.source=text", "config error: data.path: data.source='text' needs a path"),
    ("--config=experiments/nope.py", "config error: config: no config file at"),
])
def test_config_errors_exit_with_one_line_naming_the_key(tmp_path, override, message):
  out = _run([sys.executable, "-m", "launch.train", f"--workdir={tmp_path}", override])
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


LAUNCHER_CONFIGS = {"train": "experiments/lm_tiny.py", "quantize": "experiments/lm_tiny.py",
                    "finetune": "experiments/finetune_arithmetic.py",
                    "evaluate": "experiments/eval_default.py",
                    "state_tracking": "experiments/state_tracking.py"}


@pytest.mark.parametrize("launcher", list(LAUNCHER_CONFIGS))
def test_unknown_key_with_an_explicit_config_file_is_one_line_in_either_order(
    tmp_path, launcher):
  config = f"--config={LAUNCHER_CONFIGS[launcher]}"
  for args in ([config, "--config.seed.no_such_key=1"], ["--config.no_such_key=1", config],
               ["--config.seed=1", "--config=experiments/nope.py"]):
    out = _run([sys.executable, "-m", f"launch.{launcher}", f"--workdir={tmp_path}", *args])
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1, (args, out.stderr[-2000:])
    key = "config" if "nope" in args[1] else args[1 - args.index(config)].split("=")[0][9:]
    assert lines[0].startswith(f"config error: {key}: "), (args, lines)


def test_data_errors_exit_with_one_line(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "x"}\n\xff\xfe\n')
  cases = [
      (["--config.data.source=text", f"--config.data.path={tmp_path}/missing.txt"],
       "data.path: no such file"),
      (["--config.data.source=text", f"--config.data.path={empty}"],
       "data.path: the text corpus is empty"),
      (["--config.data.source=jsonl", f"--config.data.path={bad}"],
       "bad.jsonl:2: line is not valid UTF-8"),
  ]
  for args, message in cases:
    out = _run([sys.executable, "-m", "launch.train", f"--workdir={tmp_path}/w", *args])
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))
          if r["split"] == "train"]


def test_sigkill_then_rerun_resumes_the_same_curve(tmp_path, corpus):
  extra = {"train.steps": 12, "train.checkpoint_every": 3, "train.log_every": 1}
  straight = _run(_train_args(tmp_path / "straight", corpus, **extra))
  assert straight.returncode == 0, straight.stderr[-3000:]

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_args(killed, corpus, **extra), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 240
  while time.time() < deadline and not (killed / "checkpoints" / "6").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (killed / "checkpoints" / "6").exists()
  resumed = _run(_train_args(killed, corpus, **extra))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout
  assert _losses(killed) == _losses(tmp_path / "straight")
  (s1, p1), (s2, p2) = latest_params(tmp_path / "straight"), latest_params(killed)
  assert s1 == s2 == 12
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_incompatible_checkpoint_is_refused(tmp_path, corpus):
  workdir = tmp_path / "run"
  first = _run(_train_args(workdir, corpus, **{"train.steps": 2}))
  assert first.returncode == 0, first.stderr[-3000:]
  out = _run(_train_args(workdir, corpus, **{"train.steps": 2, "model.num_layers": 3}))
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
  assert "model.num_layers" in lines[0] and "incompatible model" in lines[0]
