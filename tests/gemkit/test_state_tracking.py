"""The state-tracking grid (gemkit.studies.state_tracking, launch.state_tracking): config
errors name the key, a tiny grid gives well-formed rows and a table, the
launcher fails in one line and writes its JSON."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from gemkit import config as config_lib
from gemkit.studies import state_tracking

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = {"train.steps": 2, "train.log_every": 1, "train.warmup_steps": 1,
        "train.batch_size": 4, "task.train_length": 8, "task.test_lengths": (16, 24),
        "task.eval_examples": 6, "model.num_layers": 1, "model.d_model": 16,
        "model.mlp_dim": 0, "model.num_heads": 1, "model.head_dim": 8, "model.state_dim": 2}


def _config(**overrides):
  cfg = config_lib.load_file("experiments/state_tracking.py")
  for key, value in {**TINY, **overrides}.items():
    block, name = key.split(".")
    cfg[block][name] = value
  return cfg


@pytest.mark.parametrize("key,value,message", [
    ("task.moduli", (1,), "task.moduli: must be moduli in [2, 10], got (1,)"),
    ("task.moduli", (), "task.moduli: must be moduli"),
    ("task.train_length", 0, "task.train_length: must be >= 1, got 0"),
    ("task.test_lengths", (64, 0), "task.test_lengths: must be lengths >= 1"),
    ("task.eval_examples", 0, "task.eval_examples: must be >= 1"),
    ("task.mixers", ("lstm",), "task.mixers: must be a non-empty tuple of"),
    ("task.eigenvalue_ranges", ("[-2,1]",), "task.eigenvalue_ranges: must be"),
    ("train.steps", 0, "train.steps: must be >= 1, got 0"),
    ("model.head_dim", 0, "model: (mixer 'mamba', eigenvalue_range '[0,1]')"),
])
def test_config_errors_name_the_key(key, value, message):
  cfg = _config(**{key: value})
  with pytest.raises(config_lib.ConfigError) as e:
    state_tracking.validate(cfg)
  assert message in str(e.value)
  assert e.value.key == message.split(":")[0]


def test_a_cell_the_model_rejects_names_the_cell():
  cfg = _config(**{"task.mixers": ("deltanet", "gla"), "task.eigenvalue_ranges": ("[-1,1]",)})
  with pytest.raises(config_lib.ConfigError, match=r"model: \(mixer 'gla', eigenvalue_range "
                     r"'\[-1,1\]'\): eigenvalue_range '\[-1,1\]' needs mixer"):
    state_tracking.validate(cfg)


def test_tiny_grid_gives_rows_and_a_table():
  cfg = _config(**{"task.moduli": (2, 3), "task.mixers": ("deltanet",),
                   "task.eigenvalue_ranges": ("[-1,1]",)})
  logged = []
  rows = state_tracking.run(cfg, log=logged.append)
  assert [(r["task"], r["mixer"], r["eigenvalue_range"]) for r in rows] == [
      ("parity", "deltanet", "[-1,1]"), ("mod3", "deltanet", "[-1,1]")]
  for r in rows:
    assert set(r["accuracy"]) == {"8", "16", "24"}
    # eval_examples = 6: every accuracy is a count of 6 in [0, 1].
    assert all(0.0 <= a <= 1.0 and abs(6 * a - round(6 * a)) < 1e-9
               for a in r["accuracy"].values())
    assert r["params"] > 0 and r["final_loss"] > 0 and r["total_s"] >= r["train_s"] > 0
  assert len(logged) == 2 * len(rows) and "mod 2 deltanet [-1,1] step 1/2 loss" in logged[0]
  lines = state_tracking.table(rows, cfg).splitlines()
  assert lines[0] == ("| task | layer | eigenvalues | n=8 (train) | n=16 | n=24 | chance "
                      "| train s |")
  assert len(lines) == 2 + len(rows)
  assert lines[2].startswith("| parity | deltanet | [-1,1] | ") and "| 50.0% |" in lines[2]
  assert lines[3].startswith("| mod3 | deltanet | [-1,1] | ") and "| 33.3% |" in lines[3]


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.state_tracking", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("override,message", [
    ("--config.task.modulii=(2,)", "config error: task.modulii: unknown config key"),
    ("--config.task.moduli=(1,)", "config error: task.moduli: must be moduli in [2, 10]"),
])
def test_launcher_bad_key_is_one_line(override, message):
  out = _launch(override)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_launcher_writes_json_and_table(tmp_path):
  out = _launch(*[f"--config.{k}={v}" for k, v in TINY.items()],
                "--config.task.moduli=(2,)", "--config.task.mixers=('mamba',)",
                "--config.task.eigenvalue_ranges=('[-1,1]',)",
                f"--output={tmp_path}/r.json")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| parity | mamba | [-1,1] |" in out.stdout
  result = json.loads((tmp_path / "r.json").read_text())
  assert result["command"].startswith("python -m launch.state_tracking --config.train.steps=2")
  assert [r["mixer"] for r in result["rows"]] == ["mamba"]
  assert result["config"]["task"]["test_lengths"] == [16, 24]


@pytest.mark.slow
def test_negative_eigenvalue_deltanet_learns_parity_and_extrapolates():
  """The grid's DeltaNet [-1,1] parity cell (experiments/state_tracking.py as is)."""
  cfg = config_lib.load_file("experiments/state_tracking.py")
  cfg.task.moduli, cfg.task.mixers, cfg.task.eigenvalue_ranges = (2,), ("deltanet",), ("[-1,1]",)
  cfg.task.test_lengths = (64, 128)
  row, = state_tracking.run(cfg, log=lambda _: None)
  assert min(row["accuracy"].values()) >= 0.95, row["accuracy"]
