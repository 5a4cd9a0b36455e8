"""Training: loss goes down, exact resume, accumulation, schedules, sharding."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

import models
from models import layers
from gemkit import optim, train
from gemkit.surgery import lora
from tests.helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _params(trainer):
  return jax.device_get(trainer.state.params)


def test_loss_decreases_on_the_default_corpus(tmp_path):
  cfg = tiny_config(**{"train.steps": 40, "train.log_every": 5, "train.lr": 3e-3,
                       "train.checkpoint_every": 1000})
  trainer = train.Trainer(cfg, tmp_path)
  before = trainer.evaluate()
  logs = [r for r in trainer.run() if r["split"] == "train"]
  after = trainer.evaluate()
  trainer.close()
  assert logs[-1]["loss"] < 0.75 * logs[0]["loss"]
  assert after["loss"] < before["loss"] - 1.0
  assert 0 < after["bpb"] < before["bpb"]


def test_exact_resume_is_bit_equal(tmp_path):
  cfg = tiny_config(tmp_path, **{"model.dropout_rate": 0.1})   # dropout: RNG must resume too
  straight = train.Trainer(cfg, tmp_path / "straight")
  straight.run()
  straight.close()
  first = train.Trainer(cfg, tmp_path / "split")
  first.run(steps=4)
  first.close()
  second = train.Trainer(cfg, tmp_path / "split")            # a fresh process would do this
  assert second.resumed_from == 4
  second.run()
  second.close()
  chex.assert_trees_all_equal(_params(straight), _params(second))
  chex.assert_trees_all_equal(jax.device_get(straight.state.opt_state),
                              jax.device_get(second.state.opt_state))
  curve = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl"))
                     if r["split"] == "train"]
  assert curve(tmp_path / "straight") == curve(tmp_path / "split")


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  a = train.Trainer(tiny_config(tmp_path), tmp_path / "a")
  b = train.Trainer(tiny_config(tmp_path, **{"train.grad_accum": 4}), tmp_path / "b")
  batch = next(a.data_iter)
  for t in (a, b):
    t.state, t.metrics = t._train_step(t.state, t._device_batch(batch))
  np.testing.assert_allclose(a.metrics["loss"], b.metrics["loss"], rtol=1e-6)
  chex.assert_trees_all_close(_params(a), _params(b), rtol=1e-5, atol=1e-6)
  a.close(), b.close()


def _one_step(trainer, batch):
  trainer.state, metrics = trainer._train_step(trainer.state, trainer._device_batch(batch))
  return jax.device_get(metrics)


def test_accumulation_weights_tokens_not_micro_batches(tmp_path):
  """Micro-batches with different target counts (padding): still the one-big-batch update."""
  a = train.Trainer(tiny_config(tmp_path), tmp_path / "a")
  b = train.Trainer(tiny_config(tmp_path, **{"train.grad_accum": 4}), tmp_path / "b")
  batch = dict(next(a.data_iter))
  batch["loss_mask"] = batch["loss_mask"].copy()
  batch["loss_mask"][:2, 3:] = 0.0        # micro-batch 0: 6 targets; the others: 2 rows each
  batch["loss_mask"][4, 10:] = 0.0
  ma, mb = _one_step(a, batch), _one_step(b, batch)
  assert ma["tokens"] == mb["tokens"] == batch["loss_mask"].sum()
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
  chex.assert_trees_all_close(_params(a), _params(b), rtol=1e-5, atol=1e-6)
  a.close(), b.close()


def test_packed_rows_train_like_separate_documents(tmp_path):
  """Two documents packed in a row (segment ids 1, 2) give the loss and gradient of
  the same documents in rows of their own (right-padded, segment 0 masked)."""
  seq = 32
  docs = np.random.default_rng(0).integers(3, 259, (4, 2, seq // 2 + 1)).astype(np.int32)

  def rows(pieces):   # pieces: per row, a list of documents [n + 1] tokens
    out = {k: np.zeros((len(pieces), seq), dt) for k, dt in
           (("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
            ("loss_mask", np.float32))}
    for r, row in enumerate(pieces):
      at = 0
      for s, doc in enumerate(row, 1):
        n = doc.size - 1
        out["inputs"][r, at:at + n], out["targets"][r, at:at + n] = doc[:-1], doc[1:]
        out["segment_ids"][r, at:at + n], out["loss_mask"][r, at:at + n] = s, 1.0
        at += n
    return out

  packed = rows([[d[0], d[1]] for d in docs])                      # 4 rows of 2 documents
  separate = rows([[d[i]] for d in docs for i in range(2)])        # 8 rows of 1 document
  runs = {}
  for name, batch in (("packed", packed), ("separate", separate)):
    cfg = tiny_config(tmp_path, **{"train.batch_size": len(batch["inputs"]),
                                   "data.seq_len": seq})
    t = train.Trainer(cfg, tmp_path / name)
    runs[name] = _one_step(t, batch)
    t.close()
  np.testing.assert_allclose(runs["packed"]["loss"], runs["separate"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(runs["packed"]["grad_norm"], runs["separate"]["grad_norm"],
                             rtol=1e-4)


def test_nonfinite_step_is_skipped_inside_the_step(tmp_path):
  t = train.Trainer(tiny_config(tmp_path), tmp_path / "run")
  good = next(t.data_iter)
  _one_step(t, good)
  before = jax.device_get((t.state.params, t.state.opt_state))
  bad = dict(good, loss_mask=np.where(np.arange(good["loss_mask"].size).reshape(
      good["loss_mask"].shape) == 5, np.inf, good["loss_mask"]).astype(np.float32))
  for run in (1, 2):
    m = _one_step(t, bad)
    assert m["skipped"] == 1 and m["nonfinite_run"] == run and m["skipped_total"] == run
    assert not np.isfinite(m["loss"])
    chex.assert_trees_all_equal(jax.device_get((t.state.params, t.state.opt_state)), before)
  assert t.step == 3
  m = _one_step(t, good)
  assert m["skipped"] == 0 and m["nonfinite_run"] == 0 and m["skipped_total"] == 2
  assert not np.array_equal(jax.device_get(t.state.params["embed"]["embedding"]),
                            before[0]["embed"]["embedding"])
  t.close()


def test_fused_projections_equal_the_layers_own():
  """The train step's one-matmul q/k/v and gate/up projections (layers.fused_dense):
  kernels of one shape stacked, of different widths concatenated, a quantized one
  alone; outputs and kernel gradients as the layers' own."""
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  same = [layers.Dense(16, 8, rngs=rngs, use_bias=True) for _ in range(2)]
  widths = [layers.Dense(16, n, rngs=rngs) for n in (8, 4, 4)]
  quantized = layers.Dense(16, 8, rngs=rngs)
  quantized.quantize("int8")
  for group in (same, widths, [same[0], quantized]):
    for got, want in zip(layers.fused_dense(x, *group), [d(x) for d in group]):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for group in (same, widths):
    grads = [nnx.grad(lambda ds, f=f: sum(jnp.sum(jnp.sin(y)) for y in f(ds)))(nnx.List(group))
             for f in (lambda ds: layers.fused_dense(x, *ds), lambda ds: [d(x) for d in ds])]
    chex.assert_trees_all_close(*map(nnx.to_pure_dict, grads), rtol=1e-5, atol=1e-6)


def test_compilation_cache_path(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert train.compilation_cache_path("", tmp_path) is None
  assert train.compilation_cache_path("auto", "w") == tmp_path / "xdg" / "gemkit" / "jax"
  assert train.compilation_cache_path("cache", tmp_path / "w") == tmp_path / "w" / "cache"
  assert train.compilation_cache_path(str(tmp_path / "c"), "w") == tmp_path / "c"


def test_compiled_steps_persist_in_the_cache(tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache
  previous = jax.config.jax_compilation_cache_dir
  try:
    t = train.Trainer(tiny_config(tmp_path, **{"train.compilation_cache_dir": "xla_cache",
                                               "train.steps": 1}), tmp_path / "run")
    t.run()
    t.close()
    assert t.compilation_cache == tmp_path / "run" / "xla_cache"
    assert any(t.compilation_cache.iterdir())                 # the train step, at least
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


@pytest.mark.parametrize("adapted", [False, True])
def test_model_fn_arrays_survive_training(tmp_path, adapted):
  """Regression: the step donated TrainState.frozen, deleting the caller's base arrays."""
  cfg = tiny_config(tmp_path, **{"train.steps": 2})
  base = models.build(cfg.model, rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, t: m(t))
  tokens = jnp.arange(48, dtype=jnp.int32).reshape(2, 24)
  expected = np.asarray(logits(base, tokens))
  before = jax.device_get(nnx.to_pure_dict(nnx.state(base)))
  model = (lora.apply_lora(nnx.clone(base), lora.LoRARule(rank=2)) if adapted
           else nnx.clone(base))                     # shares every array with base
  trainable = lora.trainable() if adapted else nnx.Param
  t = train.Trainer(cfg, tmp_path / "run", model_fn=lambda: model, trainable=trainable)
  t.run()
  t.close()
  chex.assert_trees_all_equal(jax.device_get(nnx.to_pure_dict(nnx.state(base))), before)
  np.testing.assert_array_equal(logits(base, tokens), expected)       # base still usable
  np.testing.assert_array_equal(logits(model, tokens), expected)      # model_fn's model too
  assert not np.array_equal(logits(t.model(), tokens), expected)      # the trained one moved


@pytest.mark.parametrize("decay,expected_end", [("linear", 0.1), ("cosine", 0.1),
                                                ("exp", 0.1), ("sqrt", 0.1)])
def test_wsd_schedule_shape(decay, expected_end):
  s = optim.wsd_schedule(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2,
                         decay=decay, min_ratio=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(50), s(80)], [0, 0.5, 1, 1, 1], atol=1e-6)
  assert s(90) < 1.0
  np.testing.assert_allclose(s(100), expected_end, rtol=1e-5)
  values = np.array([s(i) for i in range(80, 101)])
  assert np.all(np.diff(values) <= 1e-7)


def test_no_weight_decay_on_vectors():
  mask = optim.decay_mask({"w": jnp.ones((3, 4)), "scale": jnp.ones(4)})
  assert mask == {"w": True, "scale": False}


SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from gemkit import train
from tests.helpers import tiny_config
mesh = dict(zip(("data", "fsdp", "tensor"), map(int, sys.argv[2].split(","))))
cfg = tiny_config(**{"train.steps": 2, "train.checkpoint_every": 100,
                     **{f"mesh.{k}": v for k, v in mesh.items()}})
t = train.Trainer(cfg, sys.argv[1])
losses = [r["loss"] for r in t.run() if r["split"] == "train"]
leaves = jax.tree.leaves(jax.device_get(t.state.params))
shardings = {str(x.sharding.spec) for x in jax.tree.leaves(t.state.params)}
np.savez(sys.argv[1] + "/params.npz", *leaves)
print(json.dumps({"devices": jax.device_count(), "losses": losses, "specs": sorted(shardings)}))
"""


def _run_sharded(workdir, mesh, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(workdir), mesh],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  params = np.load(workdir / "params.npz")
  return result, [params[k] for k in sorted(params.files, key=lambda s: int(s.split("_")[1]))]


def test_sharded_step_on_8_devices_equals_1_device(tmp_path):
  (tmp_path / "one").mkdir()
  (tmp_path / "eight").mkdir()
  one, p1 = _run_sharded(tmp_path / "one", "1,1,1", 1)
  eight, p8 = _run_sharded(tmp_path / "eight", "2,2,2", 8)
  assert eight["devices"] == 8
  assert any("fsdp" in s and "tensor" in s for s in eight["specs"])  # really sharded
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_load_round_trip_gives_identical_logits(tmp_path):
  import gemkit  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(tmp_path, **{"train.steps": 4})
  trainer = train.Trainer(cfg, tmp_path / "run")
  trainer.run()
  trainer.close()
  model, loaded_cfg = gemkit.load(tmp_path / "run")
  assert loaded_cfg.model.to_dict() == cfg.model.to_dict()
  tokens = jnp.arange(24).reshape(2, 12) % 259
  np.testing.assert_array_equal(model(tokens), trainer.model()(tokens))
