"""launch.finetune end to end on a tiny base: full / LoRA / QLoRA rows, adapters, errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from benchmarks import finetune_targets
from gemkit import config as config_lib
from gemkit import runs, train
from gemkit.surgery import lora, paths, quantize
from gemkit.studies import finetune
from gemkit.config import ConfigError
from tests.helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENS = np.arange(40, dtype=np.int32).reshape(2, 20) % 259
TINY_FT = {"task.digits": 2, "task.train_examples": 300, "task.eval_examples": 16,
           "task.seq_len": 32, "train.steps": 3, "train.batch_size": 8, "train.log_every": 1,
           "train.warmup_steps": 1, "lora.rank": 2, "qlora.base_format": "nf4-g32",
           "methods": "full,lora,qlora", "seeds": 1}


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.finetune", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finetune")
  trainer = train.Trainer(tiny_config(tmp, **{"train.steps": 2}), tmp / "base")
  trainer.run()
  trainer.close()
  out = _launch(f"--config.base.workdir={tmp / 'base'}", f"--workdir={tmp / 'ft'}",
                *[f"--config.{k}={v}" for k, v in TINY_FT.items()])
  assert out.returncode == 0, out.stderr[-3000:]
  return tmp, out.stdout


def test_launch_reports_every_method_and_writes_json_and_markdown(finetuned):
  tmp, stdout = finetuned
  report = json.loads((tmp / "ft" / "finetune.json").read_text())
  rows = {r["method"]: r for r in report["rows"]}
  assert list(rows) == ["base", "full", "lora", "qlora"]
  assert "| qlora |" in (tmp / "ft" / "finetune.md").read_text() and "| lora |" in stdout
  full, lo, q = rows["full"], rows["lora"], rows["qlora"]
  assert full["trainable_params"] == full["total_params"] == rows["base"]["total_params"]
  assert lo["trainable_params"] == q["trainable_params"] and lo["trainable_pct"] < 10
  # AdamW keeps two moments per trained value: optimizer state ~ 2 x trainable bytes.
  for r in (full, lo, q):
    assert 2 * r["trainable_bytes"] <= r["opt_state_bytes"] < 2 * r["trainable_bytes"] + 64
    assert r["steps"] == 3 and r["step_s"] > 0 and r["xla_step_peak_bytes"] > 0
    assert 0 <= r["exact_match"] <= 1 and np.isfinite(r["heldout_loss"])
  dense_f32 = 4 * 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)   # the Dense kernels
  assert lo["frozen_bytes"] - q["frozen_bytes"] > 0.8 * dense_f32  # nf4-g32: 0.625 B/weight
  assert full["heldout_loss"] < rows["base"]["heldout_loss"]
  judged = finetune_targets.targets(report["rows"])
  assert set(judged) == {"lora_gain_ge_95pct_of_full", "lora_trainable_le_2pct",
                         "lora_opt_state_le_3pct_of_full", "qlora_within_2_points_of_lora"}
  assert judged["lora_trainable_le_2pct"]["value"] == lo["trainable_pct"]
  assert judged["qlora_within_2_points_of_lora"]["value"] == pytest.approx(
      100 * (lo["exact_match"] - q["exact_match"]))


def test_finetuned_runs_and_adapters_load_to_the_same_model(finetuned):
  tmp, _ = finetuned
  base, _ = runs.load(tmp / "base")
  logits = nnx.jit(lambda m, t: m(t))
  for method in ("lora", "qlora"):
    from_run, config = runs.load(tmp / "ft" / method)         # Trainer checkpoint
    assert config.train.steps == 3
    from_adapter = lora.load_adapter(nnx.clone(base), tmp / "ft" / method / "adapter")
    assert lora.adapter_names(from_adapter) == [method]
    quantized = [d.is_quantized for _, d in paths.dense_layers(from_adapter)]
    assert all(quantized) == (method == "qlora") and any(quantized) == (method == "qlora")
    np.testing.assert_array_equal(logits(from_run, TOKENS), logits(from_adapter, TOKENS))
  full, _ = runs.load(tmp / "ft" / "full")
  assert not lora.wrappers(full)


def test_errors_are_one_line(finetuned, tmp_path):
  tmp, _ = finetuned
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
  cases = [
      ([f"--config.base.workdir={tmp_path}"], "config error: base.workdir: no checkpoints"),
      ([f"--config.base.workdir={tmp / 'base'}", "--config.methods=full,qdora"],
       "config error: methods: must be a comma-separated subset of"),
      ([f"--config.base.workdir={tmp / 'base'}", "--config.lora.rank=0"],
       "config error: lora: rank must be an int >= 1, got 0"),
      ([f"--config.base.workdir={tmp / 'base'}", "--config.task.kind=jsonl",
        f"--config.task.path={bad}", f"--workdir={tmp_path / 'w'}"],
       f"config error: task.path: {bad}:2: needs string fields 'prompt' and 'completion'"),
  ]
  for args, message in cases:
    out = _launch(*args)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_jsonl_task_holds_out_by_prompt_hash(tmp_path):
  path = tmp_path / "task.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}"}) + "\n"
                          for i in range(200)))
  cfg = config_lib.load_file("experiments/finetune_arithmetic.py")
  for k, v in {"task.kind": "jsonl", "task.path": str(path), "task.heldout_fraction": 0.2,
               "task.seq_len": 32}.items():
    config_lib.override(cfg, k, v)
  task = finetune.task_data(cfg)
  prompts = lambda exs: {bytes(e.prompt) for e in exs}
  assert not prompts(task.train) & prompts(task.heldout)
  assert len(task.train) + len(task.heldout) == 200 and 20 < len(task.heldout) < 60
  assert task.summary()["heldout_completion_tokens"] == sum(
      e.completion.size for e in task.heldout)
  with pytest.raises(ConfigError, match="task.path: no such file"):
    finetune.jsonl_examples(str(tmp_path / "missing.jsonl"))


def test_seeds_are_summarised_by_their_mean_and_spread(finetuned, tmp_path):
  tmp, _ = finetuned
  cfg = config_lib.load_file("experiments/finetune_arithmetic.py")
  cfg.update_from_flattened_dict({**TINY_FT, "methods": "full,lora", "seed": 5, "seeds": 2,
                                  "base.workdir": str(tmp / "base")})
  base = finetune.Base(runs.load_source(*finetune.base_path(cfg)))
  report = finetune.run_seeds(cfg, base, tmp_path, log=lambda _: None)
  per = report["runs"]
  assert report["seeds"] == [r["config"]["seed"] for r in per] == [5, 6]
  assert per[0]["task"]["fingerprint"] != per[1]["task"]["fingerprint"]   # own draws
  assert [r["method"] for r in report["rows"]] == ["base", "full", "lora"]
  for i, row in enumerate(report["rows"]):
    for key in ("exact_match", "heldout_loss"):
      vals = [r["rows"][i][key] for r in per]
      assert row[f"{key}_seeds"] == vals
      assert row[key] == pytest.approx(np.mean(vals))
      assert row[f"{key}_std"] == pytest.approx(np.std(vals, ddof=1))
  base, full, lo = report["rows"]
  drop = base["heldout_loss"] - full["heldout_loss"]
  assert lo["loss_gain_vs_full"] == pytest.approx((base["heldout_loss"] - lo["heldout_loss"]) / drop)
  assert "targets" not in report   # benchmarks/finetune_targets.py judges the report
  for seed in (5, 6):
    assert (tmp_path / f"seed{seed}" / "lora" / "adapter").is_dir()
  assert f"{lo['exact_match']:.1%} ± " in finetune.markdown_table(report)
  cfg.seeds = 0
  with pytest.raises(ConfigError, match="seeds: must be >= 1"):
    finetune.validate_config(cfg)
