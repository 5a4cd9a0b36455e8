"""Scale-out: two processes, restore onto other device counts, SIGTERM, NaN steps, meshes.

The multi-process run is two real processes on localhost (``jax.distributed``
with gloo CPU collectives), 4 fake CPU devices each: 8 devices, a mesh with
the data axis across processes (``mesh.dcn_data=2``) and FSDP x tensor inside
each. A single-process, single-device run of the same config is the reference.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from gemkit import config as config_lib
from gemkit import sharding, train
from tests.helpers import tiny_config, write_corpus

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 240                     # seconds, per subprocess
STEPS = 8
BASE = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 1000,
        "train.max_nonfinite_steps": 2}
MULTI_MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.dcn_data": 2}

# Every process: train 3 steps (saved at 3), dump the gathered params, copy
# the checkpoints; then process 1 alone gets SIGTERM and both must stop at
# the same step with a checkpoint of it.
MULTI_SCRIPT = r"""
import json, os, shutil, signal, sys
import numpy as np
from gemkit import sharding
pid, port, workdir, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sharding.initialize_distributed(f"localhost:{port}", 2, pid)
import jax
from jax.experimental import multihost_utils
from gemkit import train
from tests.helpers import tiny_config
t = train.Trainer(tiny_config(**overrides), workdir)
logged = t.run(3)
losses = [r["loss"] for r in logged if r["split"] == "train"]
eval_loss = [r["loss"] for r in logged if r["split"] == "eval"]
leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for x in jax.tree.leaves(t.state.params)]
specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(t.state.params)})
if pid == 0:
  np.savez(workdir + "/params3.npz", *leaves)
  shutil.copytree(workdir + "/checkpoints", workdir + "/copy3/checkpoints")
multihost_utils.sync_global_devices("copied")
if pid == 1:
  read, batch_of = [0], t._device_batch
  def signal_on_second_batch(batch):
    read[0] += 1
    if read[0] == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch_of(batch)
  t._device_batch = signal_on_second_batch
stopped = None
try:
  t.run(steps=300)
except train.Preempted as e:
  stopped = e.step
print(json.dumps({"losses": losses, "eval_loss": eval_loss, "devices": jax.device_count(),
                  "specs": specs,
                  "processes": jax.process_count(), "mesh": dict(t.mesh.shape),
                  "stopped": stopped, "latest": t.checkpointer.latest_step()}))
"""

# One process restores the step-3 checkpoint onto its own devices and takes one step.
RESTORE_SCRIPT = r"""
import json, sys
import jax, numpy as np
from gemkit import train
from tests.helpers import tiny_config
t = train.Trainer(tiny_config(**json.loads(sys.argv[2])), sys.argv[1])
leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(t.state.params))]
np.savez(sys.argv[1] + "/restored.npz", *leaves)
loss = [r["loss"] for r in t.run(1) if r["split"] == "train"][0]
print(json.dumps({"devices": jax.device_count(), "resumed_from": t.resumed_from, "loss": loss}))
"""


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def _run_script(script, *args, devices=8):
  """Runs ``python -c script args`` on ``devices`` fake CPU devices; its last
  stdout line, parsed as JSON."""
  out = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=_env(devices),
                       capture_output=True, text=True, timeout=TIMEOUT)
  assert out.returncode == 0, out.stderr[-4000:]
  return _last_json(out.stdout)


def _npz(path):
  data = np.load(path)
  return [data[k] for k in sorted(data.files, key=lambda s: int(s.split("_")[1]))]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The corpus overrides and a reference single-device run of STEPS steps.

  ``trainer`` is that run's Trainer, left open at step STEPS for a test that
  continues it (compiling a Trainer is most of a test's cost).
  """
  root = tmp_path_factory.mktemp("scaleout")
  overrides = {**BASE, "data.source": "text", "data.path": write_corpus(root),
               "data.heldout_fraction": 0.1}
  ref = train.Trainer(tiny_config(**overrides), root / "reference")
  eval3 = [r["loss"] for r in ref.run(3) if r["split"] == "eval"]
  params3 = _leaves(ref.state.params)
  ref.run()
  losses = [r["loss"] for r in ref.history if r["split"] == "train"]
  assert len(losses) == STEPS and all(np.isfinite(losses))
  yield types.SimpleNamespace(root=root, overrides=overrides, losses=losses, eval3=eval3,
                              params3=params3, trainer=ref)
  ref.close()


@pytest.fixture(scope="module")
def two_processes(setup):
  """Runs MULTI_SCRIPT as processes 0 and 1; returns (workdir, [result0, result1])."""
  workdir = setup.root / "multi"
  workdir.mkdir()
  overrides = json.dumps({**setup.overrides, **MULTI_MESH})
  return workdir, run_pair(MULTI_SCRIPT, [str(workdir), overrides], devices=4)


def run_pair(script: str, args: list[str], devices: int) -> list[dict]:
  """Runs ``script`` as processes 0 and 1 (argv: pid, port, *args) with ``devices``
  fake CPU devices each; returns the last JSON line each printed."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", script, str(pid), str(port), *args],
                            cwd=REPO, env=_env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for pid in (0, 1)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  return [_last_json(out) for out, _ in outputs]


def test_two_processes_match_one_process(setup, two_processes):
  workdir, results = two_processes
  for r in results:
    assert r["processes"] == 2 and r["devices"] == 8
    assert r["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    np.testing.assert_allclose(r["losses"], setup.losses[:3], rtol=1e-5)
    np.testing.assert_allclose(r["eval_loss"], setup.eval3, rtol=1e-5)   # global eval batches
  assert any("fsdp" in s and "tensor" in s for s in results[0]["specs"])   # really sharded
  for got, want in zip(_npz(workdir / "params3.npz"), setup.params3):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  # Each process wrote its own data iterator state, at the same position.
  data_files = sorted((workdir / "copy3" / "checkpoints" / "3" / "data").glob("*.json"))
  assert [f.name for f in data_files] == ["process_0-of-2.json", "process_1-of-2.json"]
  assert len({f.read_text() for f in data_files}) == 1


def test_sigterm_on_one_process_stops_both_at_the_same_saved_step(two_processes):
  workdir, results = two_processes
  stopped = {r["stopped"] for r in results}
  assert len(stopped) == 1 and None not in stopped, results
  step = stopped.pop()
  assert 5 <= step < 303 and results[0]["latest"] == step
  checkpoints = workdir / "checkpoints"
  assert {p.name for p in checkpoints.iterdir()} == {"3", str(step)}      # no partial dirs
  assert (checkpoints / str(step) / "data" / "process_1-of-2.json").exists()


@pytest.mark.parametrize("devices", [4, 1])
def test_restore_8_device_checkpoint_onto_fewer_devices(setup, two_processes, devices,
                                                        tmp_path):
  """Saved by 2 processes x 4 devices (data x fsdp x tensor); restored by one process on
  4 devices (fsdp x sequence) and on 1 device."""
  workdir, _ = two_processes
  shutil.copytree(workdir / "copy3", tmp_path / "run")
  mesh = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.sequence": 2} if devices == 4 else {}
  overrides = {**setup.overrides, **mesh}
  if devices == 1:    # in this (single-device) process
    t = train.Trainer(tiny_config(**overrides), tmp_path / "run")
    restored, resumed_from = _leaves(t.state.params), t.resumed_from
    loss = [r["loss"] for r in t.run(1) if r["split"] == "train"][0]
    t.close()
  else:
    result = _run_script(RESTORE_SCRIPT, str(tmp_path / "run"), json.dumps(overrides),
                         devices=devices)
    assert result["devices"] == devices
    restored, resumed_from, loss = (_npz(tmp_path / "run" / "restored.npz"),
                                    result["resumed_from"], result["loss"])
  assert resumed_from == 3
  for got, saved in zip(restored, _npz(workdir / "params3.npz")):
    np.testing.assert_array_equal(got, saved)
  np.testing.assert_allclose(loss, setup.losses[3], rtol=1e-5)


def _hook_train_steps(trainer, hook):
  """Calls ``hook(n, batch) -> batch`` on the n-th train step's batch (1-based, from now)."""
  calls, step_fn = [0], trainer._train_step

  def hooked(state, batch):
    calls[0] += 1
    return step_fn(state, hook(calls[0], batch))

  trainer._train_step = hooked


def _poison(numbers):
  """A hook making one loss-mask entry NaN in the given train steps' batches."""
  def hook(n, batch):
    if n in numbers:
      batch = dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(np.nan))
    return batch
  return hook


def test_sigterm_saves_at_the_step_boundary_and_resume_continues_the_curve(setup, tmp_path):
  t = train.Trainer(tiny_config(**setup.overrides), tmp_path)

  def sigterm_in_step_5(n, batch):     # a real SIGTERM, delivered as step 5 starts
    if n == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _hook_train_steps(t, sigterm_in_step_5)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.Preempted) as stopped:
    t.run()
  t.close()
  assert stopped.value.step == 5 and stopped.value.code == 0
  assert signal.getsignal(signal.SIGTERM) == handler               # restored after the run
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]
  resumed = train.Trainer(tiny_config(**setup.overrides), tmp_path)
  assert resumed.resumed_from == 5
  resumed.run()
  resumed.close()
  curve = [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
           if r["split"] == "train"]
  assert [s for s, _ in curve] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in curve], setup.losses, rtol=1e-6)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(setup):
  t = setup.trainer                           # at step STEPS; max_nonfinite_steps = 2
  _hook_train_steps(t, _poison({2, 5, 6}))
  first = STEPS + 1
  t.run(1)
  before = _leaves((t.state.params, t.state.opt_state))
  [logged] = [r for r in t.run(1) if r["split"] == "train"]           # NaN in the batch
  assert logged["step"] == first + 1
  assert np.isnan(logged["loss"]) and logged["skipped_steps"] == 1
  for a, b in zip(_leaves((t.state.params, t.state.opt_state)), before):
    np.testing.assert_array_equal(a, b)                               # update skipped
  assert t.step == first + 1 and t.skipped_steps == 1
  [logged] = [r for r in t.run(1) if r["split"] == "train"]           # fine again
  assert np.isfinite(logged["loss"]) and logged["skipped_steps"] == 1
  assert int(t.state.nonfinite_run) == 0
  after = _leaves(t.state.params)
  assert all(np.isfinite(x).all() for x in after)
  assert any(not np.array_equal(a, b) for a, b in zip(after, before))
  bad = f"steps {first + 4}..{first + 5}"
  with pytest.raises(train.NonFiniteError, match=rf"2 steps in a row \({bad}.*step {first + 2}"):
    t.run(5)                                                          # 2 NaN steps in a row
  assert t.checkpointer.latest_step() == first + 2                    # the last good one
  assert t.skipped_steps == 3


# The per-shard scripts below: ``spy(name, fn)`` records the shape of the
# first argument of every call of an op in ``seen[name]``.
SPY_PRELUDE = r"""
import json
import jax, jax.numpy as jnp
from flax import nnx
import models
from gemkit import sharding

seen = {}
def spy(name, fn):
  def wrapped(*a, **k):
    seen.setdefault(name, set()).add(tuple(a[0].shape))
    return fn(*a, **k)
  return wrapped
"""


# A transformer whose attention and two quantized MLP projections take the
# Pallas (Triton, interpreted) path, on a 2x2x2 mesh: every kernel call must
# see its shard (rows over data x fsdp, heads and MLP columns over tensor),
# and the logits and a decode step must equal the unsharded model's.
SHARD_MAP_SCRIPT = SPY_PRELUDE + r"""
from models import layers
from ops import attention, quant
from tests.helpers import tiny_config

attention.block_sparse_attention = spy("attention", attention.block_sparse_attention)
attention.decode_attention = spy("decode", attention.decode_attention)
layers.quant.quantized_matmul = spy("matmul", quant.quantized_matmul)

cfg = tiny_config(**{"model.attention": "sliding", "model.window": 32, "model.block_size": 16,
                     "model.attention_impl": "pallas_gpu", "model.num_heads": 4,
                     "model.num_kv_heads": 2}).model
model = models.build(cfg, rngs=nnx.Rngs(0))
for path, m in nnx.iter_modules(model):
  if path and path[-1] in ("up_proj", "down_proj"):
    m.quantize("int8", impl="pallas_gpu")
graphdef, state = nnx.split(model)
forward = jax.jit(lambda s, t, g: nnx.merge(graphdef, s)(t, g))
decode = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c)[0])
tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, 256)
seg = jnp.ones_like(tokens)
cache = model.init_cache(8, 80)
cache = cache.replace(lengths=jnp.arange(8, dtype=jnp.int32) * 9)
want = forward(state, tokens, seg), decode(state, tokens[:, :1], cache)
unsharded = {k: sorted(v) for k, v in seen.items()}
seen.clear()
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
with sharding.activate(mesh):
  state = jax.device_put(state, sharding.param_shardings(state, mesh))
  rows = sharding.logical_sharding(mesh, ("batch", None))
  got = (forward(state, jax.device_put(tokens, rows), jax.device_put(seg, rows)),
         decode(state, tokens[:, :1], cache))
  odd = layers.shard_map_op(lambda x: x * 2, [("batch", None)], ("batch", None))(tokens[:3])
try:
  sharding.check_batch(mesh, 6, 32)
  bad_batch = None
except Exception as e:
  bad_batch = str(e)
print(json.dumps({"bad_batch": bad_batch,
    "err": [float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want)],
    "unsharded": unsharded, "sharded": {k: sorted(v) for k, v in seen.items()},
    "odd_rows_equal": bool(jnp.array_equal(odd, tokens[:3] * 2))}))
"""


def test_pallas_ops_run_per_shard_inside_the_sharded_model():
  r = _run_script(SHARD_MAP_SCRIPT)
  assert max(r["err"]) < 1e-5, r
  # [B, T, H, D] = [8, 64, 4, 16] whole; per shard 8/4 rows and 4/2 heads.
  assert r["unsharded"]["attention"] == [[8, 64, 4, 16]]
  assert r["sharded"]["attention"] == [[2, 64, 2, 16]]
  assert r["sharded"]["decode"] == [[2, 2, 16]]                  # [B, H, D] one query each
  # MLP matmuls: x rows split 4 ways, K whole (the kernel reads the packed weight).
  assert r["sharded"]["matmul"] == [[2, 1, 64], [2, 1, 128], [2, 64, 64], [2, 64, 128]]
  assert r["odd_rows_equal"]                  # 3 rows do not split 4 ways: the op unsharded
  assert "train.batch_size: 6 rows do not split over the data x fsdp = 4" in r["bad_batch"]


# Top-k with NSA scores on the Triton path: the per-kv-head block scores are
# split with the kv heads (tensor 2 of Hkv 2), or copied per query head when
# the tensor axis does not divide Hkv (tensor 4); logits equal the unsharded.
TOPK_SHARD_SCRIPT = SPY_PRELUDE + r"""
from ops import attention
from tests.helpers import tiny_config

attention.topk_block_attention = spy("topk", attention.topk_block_attention)
cfg = tiny_config(**{"model.attention": "topk", "model.topk_scores": "compressed",
                     "model.compressed_branch": True,
                     "model.top_k": 1, "model.block_size": 16, "model.query_block": 16,
                     "model.attention_impl": "pallas_gpu", "model.num_heads": 4,
                     "model.num_kv_heads": 2}).model
model = models.build(cfg, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(model)
forward = jax.jit(lambda s, t, g: nnx.merge(graphdef, s)(t, g))
tokens = jax.random.randint(jax.random.key(1), (4, 80), 0, 256)
seg = jnp.ones_like(tokens)
want = forward(state, tokens, seg)
report = {}
for tensor in (2, 4):
  seen.clear()
  mesh = sharding.make_mesh({"data": 8 // tensor, "tensor": tensor})
  with sharding.activate(mesh):
    got = forward(jax.device_put(state, sharding.param_shardings(state, mesh)), tokens, seg)
  report[tensor] = {"err": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
                    "sharded": sorted(seen["topk"])}
print(json.dumps(report))
"""


def test_topk_scores_follow_the_kv_head_shards():
  r = _run_script(TOPK_SHARD_SCRIPT)
  assert r["2"]["err"] < 1e-5 and r["4"]["err"] < 1e-5, r
  assert r["2"]["sharded"] == [[1, 80, 2, 16]]      # q per shard: 4/4 rows, 4/2 heads
  assert r["4"]["sharded"] == [[2, 80, 1, 16]]      # 4/2 rows, 4/4 heads (kv copied)


# The recurrent families with their scans on the Pallas (Triton, interpreted)
# path on the same mesh: each scan sees its rows and heads (matrix state) or
# channels (diagonal), and the logits equal the unsharded model's.
SCAN_SHARD_MAP_SCRIPT = SPY_PRELUDE + r"""
from gemkit import config as config_lib
from ops import scan

for name in ("linear_scan", "chunked_linear_attention", "delta_rule"):
  setattr(scan, name, spy(name, getattr(scan, name)))

mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
small = {"model.num_layers": 2, "model.d_model": 32, "model.mlp_dim": 64,
         "model.num_heads": 2, "model.head_dim": 16, "model.scan_impl": "pallas_gpu"}
tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, 256)
segments = jnp.concatenate([jnp.ones((8, 20), jnp.int32), jnp.full((8, 12), 2, jnp.int32)], 1)
report = {}
for name in ("gla_tiny", "deltanet_tiny", "hawk_tiny"):
  model = models.build(config_lib.load(f"experiments/{name}.py", **small).model,
                       rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t, g: nnx.merge(graphdef, s)(t, g))
  seen.clear()
  want = forward(state, tokens, segments)
  with sharding.activate(mesh):
    seen.clear()
    got = forward(jax.device_put(state, sharding.param_shardings(state, mesh)), tokens, segments)
  report[name] = {"err": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
                  "sharded": {k: sorted(v) for k, v in seen.items()}}
print(json.dumps(report))
"""


def test_scans_run_per_shard_inside_the_sharded_recurrent_models():
  r = _run_script(SCAN_SHARD_MAP_SCRIPT)
  assert all(v["err"] < 1e-5 for v in r.values()), r
  # [B, T, H, K] = [8, 32, 2, 16]: 8/4 rows, 2/2 heads per shard.
  assert r["gla_tiny"]["sharded"] == {"chunked_linear_attention": [[2, 32, 1, 16]]}
  assert r["deltanet_tiny"]["sharded"] == {"delta_rule": [[2, 32, 1, 16]]}
  # RG-LRU channels [B, T, width 32]: 8/4 rows, 32/2 channels.
  assert r["hawk_tiny"]["sharded"] == {"linear_scan": [[2, 32, 16]]}


# --- meshes, config and start-up (no devices needed) ------------------------------


def _fake_devices(processes, per_process, slices=None):
  devices = []
  for p in range(processes):
    for i in range(per_process):
      d = types.SimpleNamespace(id=p * per_process + i, process_index=p, platform="cpu",
                                device_kind="cpu")
      if slices:
        d.slice_index = p * slices // processes
      devices.append(d)
  return devices


def _mesh_cfg(**values):
  return ml_collections.ConfigDict({**tiny_config().mesh.to_dict(), **values})


def test_hybrid_mesh_puts_the_dcn_axis_across_processes():
  devices = _fake_devices(processes=2, per_process=4)
  grid = sharding.device_grid(_mesh_cfg(data=1, fsdp=2, tensor=2, dcn_data=2), devices)
  assert grid.shape == (2, 2, 1, 2)
  assert {d.process_index for d in grid[0].flat} == {0}
  assert {d.process_index for d in grid[1].flat} == {1}
  # -1 takes what is left: of the devices of a slice (ICI) and of the slices (DCN).
  grid = sharding.device_grid(_mesh_cfg(data=1, fsdp=-1, dcn_data=-1), devices)
  assert grid.shape == (2, 4, 1, 1)
  # With all DCN sizes 1 the job is one slice (as before): data=-1 spans all devices.
  assert sharding.device_grid(_mesh_cfg(), devices).shape == (8, 1, 1, 1)
  # TPU-style slices (slice_index) are the DCN granules, whatever the processes.
  tpu = _fake_devices(processes=4, per_process=2, slices=2)
  grid = sharding.device_grid(_mesh_cfg(data=-1, dcn_fsdp=2), tpu)
  assert grid.shape == (4, 2, 1, 1)
  assert [{d.slice_index for d in grid[:, j].flat} for j in (0, 1)] == [{0}, {1}]


@pytest.mark.parametrize("values,message", [
    ({"data": 3}, "needs 3 devices per slice, have 8"),
    ({"data": 3, "fsdp": -1}, "does not divide the 8 devices per slice"),
    ({"dcn_data": 3}, "needs 3 slices, have 2"),
    ({"data": -1, "dcn_data": -1, "dcn_fsdp": -1}, "at most one of .*dcn_data.* may be -1"),
])
def test_mesh_errors_name_the_sizes(values, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    sharding.device_grid(_mesh_cfg(**values), _fake_devices(processes=2, per_process=4))


def test_several_slices_need_a_dcn_axis():
  tpu = _fake_devices(processes=2, per_process=4, slices=2)
  with pytest.raises(config_lib.ConfigError, match="2 slices but all mesh.dcn_.* sizes are 1"):
    sharding.device_grid(_mesh_cfg(), tpu)


@pytest.mark.parametrize("override,key", [
    ({"mesh.dcn_data": 0}, "mesh.dcn_data"),
    ({"mesh.fsdp": -1}, "mesh"),                  # data is -1 already
    ({"mesh.sequence": 3}, "mesh.sequence"),      # does not divide seq_len 32
    ({"train.max_nonfinite_steps": -1}, "train.max_nonfinite_steps"),
])
def test_config_validation_names_the_key(override, key):
  with pytest.raises(config_lib.ConfigError) as e:
    tiny_config(**override)
  assert e.value.key == key
  tiny_config(**{"mesh.sequence": 2, "mesh.dcn_data": -1})     # these are fine


def test_initialize_distributed_reads_the_environment(monkeypatch):
  jax.devices()                          # this process has started jax already
  for name in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False              # one process: nothing to do
  monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "1")
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "two")
  with pytest.raises(config_lib.ConfigError, match="JAX_NUM_PROCESSES: must be an integer"):
    sharding.initialize_distributed()
  monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "2")             # too late in this process
  with pytest.raises(RuntimeError, match="must run before any jax computation"):
    sharding.initialize_distributed(coordinator_address="localhost:1", process_id=0)
