"""The interactive API: the notebook's code paths are the launchers' code paths.

Trainer driven from Python a few steps at a time == launch.train; gemkit.load
round trips (run dir, checkpoints/, checkpoints/<step>, quantized run);
config.load with another validator; metrics.plot.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemkit
from gemkit import config as config_lib
from gemkit import metrics, runs, train
from gemkit.surgery import paths, quantize
from gemkit.studies import quantize as quantize_study
from tests.helpers import TINY, latest_params, tiny_config, write_corpus

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENS = jnp.arange(2 * 21).reshape(2, 21) * 7 % 259


def test_trainer_driven_from_cells_equals_launch_train(tmp_path):
  """Trainer.run(steps=3) twice in-process == `python -m launch.train` for 6 steps, bit for bit."""
  values = {**TINY, "data.source": "text", "data.path": write_corpus(tmp_path),
            "data.heldout_fraction": 0.1, "train.steps": 6, "train.checkpoint_every": 3,
            "model.dropout_rate": 0.1}      # dropout: the RNG stream must match too
  cli = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=experiments/lm_tiny.py",
       f"--workdir={tmp_path / 'cli'}"] + [f"--config.{k}={v}" for k, v in values.items()],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert cli.returncode == 0, cli.stderr[-3000:]

  cfg = config_lib.load("experiments/lm_tiny.py", **values)
  trainer = train.Trainer(cfg, tmp_path / "cells")
  first, second = trainer.run(steps=3), trainer.run(steps=3)
  trainer.close()
  assert [r["step"] for r in first + second if r["split"] == "train"] == [2, 3, 4, 6]
  assert trainer.history == first + second

  step, cli_params = latest_params(tmp_path / "cli")
  assert step == trainer.step == 6
  cli_leaves = jax.tree.leaves(cli_params)
  cell_leaves = jax.tree.leaves(jax.device_get(trainer.state.params))
  assert len(cli_leaves) == len(cell_leaves) > 0
  for a, b in zip(cli_leaves, cell_leaves):
    np.testing.assert_array_equal(a, b)
  cli_log = {r["step"]: r["loss"] for r in metrics.read(tmp_path / "cli") if r["split"] == "train"}
  for r in first + second:
    if r["split"] == "train" and r["step"] in cli_log:
      assert r["loss"] == cli_log[r["step"]]


def test_load_from_run_dir_and_checkpoint_paths(tmp_path):
  """train -> gemkit.load(run | checkpoints/ | checkpoints/<step>) -> identical logits."""
  cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2})
  run = tmp_path / "run"
  trainer = train.Trainer(cfg, run)
  trainer.run(steps=2)
  at_2 = trainer.model()(TOKENS)
  trainer.run(steps=2)
  at_4 = trainer.model()(TOKENS)
  trainer.close()
  assert not np.array_equal(at_2, at_4)
  for path, expected in ((run, at_4), (str(run / "checkpoints"), at_4),
                         (run / "checkpoints" / "2", at_2)):
    model, loaded_cfg = gemkit.load(path)
    assert loaded_cfg.to_dict() == cfg.to_dict()
    np.testing.assert_array_equal(model(TOKENS), expected)
  with pytest.raises(config_lib.ConfigError, match="no complete checkpoint 3 under"):
    gemkit.load(run / "checkpoints" / "3")

  # A quantized run directory (launch.quantize's) comes back quantized, same logits.
  quantize_study.quantize_run(runs.load_source(run), ["int8"], eval_windows=1,
                              log=lambda line: None)
  loaded, _ = gemkit.load(tmp_path / "run_quant" / "int8")
  expected, _ = quantize.quantize_model(trainer.model(), quantize.default_rules("int8"))
  assert any(d.is_quantized for _, d in paths.dense_layers(loaded))
  np.testing.assert_array_equal(loaded(TOKENS), expected(TOKENS))


def test_config_load_takes_another_validator():
  """Launchers' other configs (eval, fine-tuning) load in a cell with their own validator."""
  from gemkit import evaluate  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load(evaluate.DEFAULT_EVAL_CONFIG, validator=evaluate.validate_config,
                        **{"heldout.stride": "32", "mqar.num_examples": 4})
  assert cfg.heldout.stride == 32 and cfg.mqar.num_examples == 4
  with pytest.raises(config_lib.ConfigError, match="heldout.stride: must be in"):
    config_lib.load(evaluate.DEFAULT_EVAL_CONFIG, validator=evaluate.validate_config,
                    **{"heldout.stride": 0})
  with pytest.raises(config_lib.ConfigError, match="heldout.strid: unknown config key"):
    config_lib.load(evaluate.DEFAULT_EVAL_CONFIG, validator=evaluate.validate_config,
                    **{"heldout.strid": 4})


def test_metrics_plot_from_records_and_workdir(tmp_path):
  records = [{"step": s, "split": "train", "loss": 5.0 / s, "lr": 0.1} for s in (1, 2, 3)]
  records.append({"step": 3, "split": "eval", "loss": 2.0, "bpb": 3.0})
  fig = metrics.plot(records, keys=("loss", "lr"), title="t")
  loss_ax, lr_ax = fig.axes
  train_line, eval_line = loss_ax.get_lines()
  np.testing.assert_array_equal(train_line.get_xdata(), [1, 2, 3])
  np.testing.assert_allclose(train_line.get_ydata(), [5.0, 2.5, 5.0 / 3])
  np.testing.assert_array_equal(eval_line.get_ydata(), [2.0])
  assert len(lr_ax.get_lines()) == 1     # eval records have no lr

  writer = metrics.MetricWriter(tmp_path, stream=open(os.devnull, "w"))
  for r in records:
    writer.write(r["step"], r["split"], {k: v for k, v in r.items() if k not in ("step", "split")})
  from_dir = metrics.plot(tmp_path)
  np.testing.assert_allclose(from_dir.axes[0].get_lines()[0].get_ydata(),
                             train_line.get_ydata())
  with pytest.raises(FileNotFoundError, match="no metrics log"):
    metrics.plot(tmp_path / "nowhere")
