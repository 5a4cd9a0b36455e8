"""Small configs and corpora for fast tests."""

import pathlib

from gemkit import config as config_lib

TINY = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.head_dim": 16, "model.mlp_dim": 128,
    "data.seq_len": 32, "data.eval_windows": 8, "data.prefetch": 1,
    "train.batch_size": 8, "train.steps": 8, "train.warmup_steps": 2,
    "train.log_every": 2, "train.eval_every": 1000, "train.checkpoint_every": 4,
    "train.async_checkpoint": False, "train.sample_tokens": 8,
}


def write_corpus(directory: pathlib.Path, n_docs: int = 40) -> str:
  """A text corpus of n_docs small files; returns the comma-separated paths."""
  paths = []
  for i in range(n_docs):
    p = directory / f"doc{i:03d}.txt"
    p.write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)))
    paths.append(str(p))
  return ",".join(paths)


def latest_params(workdir: pathlib.Path):
  """(step, params as saved) of the newest checkpoint of the run in ``workdir``."""
  from gemkit import checkpoint  # pylint: disable=g-import-not-at-top
  with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as ck:
    step = ck.latest_step()
    return step, ck.restore(step)["params"]


def tiny_config(tmp_path: pathlib.Path | None = None, **overrides):
  """lm_tiny shrunk to seconds; on a small text corpus when tmp_path is given."""
  values = dict(TINY)
  if tmp_path is not None:
    values.update({"data.source": "text", "data.path": write_corpus(tmp_path),
                   "data.heldout_fraction": 0.1})
  values.update(overrides)
  return config_lib.load("experiments/lm_tiny.py", **values)
