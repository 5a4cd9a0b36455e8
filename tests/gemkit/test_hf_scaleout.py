"""gemkit.hf.load_weights onto a mesh that spans two processes.

Two real processes on localhost (``jax.distributed``, gloo CPU collectives),
2 fake CPU devices each, load a tiny random Llama checkpoint (transformers,
sharded safetensors with an index, q/k/v/o biases) with
``load_weights(..., mesh=mesh)`` on two meshes:

- ``fsdp``: ``mesh.tensor=2`` inside a process, ``mesh.dcn_fsdp=2`` across
  the processes: every parameter with an ``embed`` dimension is split
  between the processes;
- ``tensor``: ``mesh.fsdp=2`` inside, ``mesh.dcn_tensor=2`` across: heads,
  MLP and vocabulary dimensions are split between the processes.

Checked against a single-process load of the same directory: every
parameter's global value (``process_allgather``) and its sharding, the
logits of a small batch against transformers' (rel 1e-5), and that each
process read from the files exactly the elements of its own devices' shards:
``TensorReader.read`` is wrapped in the processes to record every
``(name, index)`` asked for.

The vocabulary (302) is not a multiple of 128. An odd vocabulary (301) does
not split in two: jax places only even shardings, so its dim stays whole
along ``tensor`` (``sharding.logical_sharding`` with the shape; the Trainer
places it the same way) and is still split along ``fsdp``
(``test_odd_vocab_on_a_tensor_split_mesh``).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from gemkit.hf import convert  # pylint: disable=wrong-import-position
from tests.gemkit.test_scaleout import run_pair  # pylint: disable=wrong-import-position

VOCAB, ODD_VOCAB = 302, 301
LOCAL_DEVICES = 2                 # fake CPU devices per process
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
             tie_word_embeddings=False, attention_bias=True)
MESHES = {
    "fsdp": {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 2, "dcn_fsdp": 2},
    "tensor": {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 1, "dcn_tensor": 2},
}
# (checkpoint, mesh) loaded by both processes, in this order.
CASES = {"fsdp": ("llama", "fsdp"), "tensor": ("llama", "tensor"),
         "odd_vocab": ("llama_odd_vocab", "fsdp")}
# A vocabulary of 301 does not split over tensor=2: it stays whole along tensor.
ODD_VOCAB_SPECS = {("embed", "embedding"): (None, "fsdp"), ("head", "kernel"): ("fsdp", None)}
# The PartitionSpec every parameter must get, by its last two path entries.
EXPECTED_SPECS = {
    ("embed", "embedding"): ("tensor", "fsdp"),
    ("head", "kernel"): ("fsdp", "tensor"),
    ("q_proj", "kernel"): ("fsdp", "tensor"),
    ("k_proj", "kernel"): ("fsdp", "tensor"),
    ("v_proj", "kernel"): ("fsdp", "tensor"),
    ("o_proj", "kernel"): ("tensor", "fsdp"),
    ("q_proj", "bias"): ("tensor",),
    ("k_proj", "bias"): ("tensor",),
    ("v_proj", "bias"): ("tensor",),
    ("o_proj", "bias"): ("fsdp",),
    ("gate_proj", "kernel"): ("fsdp", "tensor"),
    ("up_proj", "kernel"): ("fsdp", "tensor"),
    ("down_proj", "kernel"): ("tensor", "fsdp"),
    ("attn_norm", "scale"): ("fsdp",),
    ("mlp_norm", "scale"): ("fsdp",),
    ("final_norm", "scale"): ("fsdp",),
}

# Each process: wrap TensorReader.read, load every case on its mesh, gather
# the parameters (process 0 saves them), run the model on a small batch, and
# compare what it read with what its devices hold.
SCRIPT = r"""
import json, sys
import numpy as np
from gemkit import sharding
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cases, meshes = json.loads(sys.argv[4]), json.loads(sys.argv[5])
sharding.initialize_distributed(f"localhost:{port}", 2, pid)
import jax, ml_collections
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from gemkit.hf import architectures, checkpoint, convert
import models

reads = []
original_read = checkpoint.TensorReader.read
def recording_read(self, name, index=None):
  a = original_read(self, name, index)
  full = self.shape(name)
  span = [[0, n] for n in full] if index is None else [
      list(s.indices(n)[:2]) for s, n in zip(index, full)]
  reads.append((name, span))
  return a
checkpoint.TensorReader.read = recording_read

def box(span, shape):
  m = np.zeros(shape, bool)
  m[tuple(slice(a, b) for a, b in span)] = True
  return m

out = {"processes": jax.process_count(), "devices": jax.device_count()}
ids = np.load(workdir + "/ids.npy")
for case, (name, mesh_name) in cases.items():
  d = f"{workdir}/{name}"
  mesh = sharding.make_mesh(ml_collections.ConfigDict(meshes[mesh_name]))
  cfg = convert.model_config(d)
  reads.clear()
  try:
    model = convert.load_weights(cfg, d, mesh=mesh)
  except Exception as e:  # reported to the test, which decides
    out[case] = {"error": f"{type(e).__name__}: {e}"}
    continue
  arch = architectures.of_config_json(checkpoint.read_config(d), d)
  tensors = {t.path: t for t in arch.tensors(models.family_config(cfg))}
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  info, gathered = {}, {}
  for path, var in params.items():
    x, t = var.get_value(), tensors[path]
    key = ".".join(map(str, path))
    gathered[key] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    hf_shape = tuple(reversed(x.shape)) if t.transpose else tuple(x.shape)
    own = np.zeros(hf_shape, bool)
    for shard in x.addressable_shards:
      span = [list(s.indices(n)[:2]) for s, n in zip(shard.index, x.shape)]
      own |= box(span[::-1] if t.transpose else span, hf_shape)
    read = np.zeros(hf_shape, bool)
    calls = [s for n, s in reads if n == t.name]
    for span in calls:
      read |= box(span, hf_shape)
    info[key] = {"tensor": t.name, "spec": [a for a in x.sharding.spec],
                 "mesh": dict(x.sharding.mesh.shape), "reads": len(calls),
                 "read_elements": int(sum(np.prod([b - a for a, b in s]) for s in calls)),
                 "read_is_own": bool((read == own).all()), "own": int(own.sum()),
                 "size": int(own.size)}
  tokens = jax.make_array_from_callback(ids.shape, NamedSharding(mesh, P()), lambda i: ids[i])
  with sharding.activate(mesh):
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
  logits = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
  if pid == 0:
    np.savez(f"{workdir}/{case}.npz", logits=logits, **gathered)
  out[case] = {"mesh": dict(mesh.shape), "params": info,
               "unknown_reads": sorted({n for n, _ in reads} - {t.name for t in tensors.values()})}
  multihost_utils.sync_global_devices(case)
print(json.dumps(out))
"""


def _save_llama(directory, vocab, seed):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **LLAMA))
  with torch.no_grad():   # norms and biases away from their initial ones and zeros
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.3)
  model.eval().save_pretrained(directory, max_shard_size="40KB")
  return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The checkpoints, the transformers logits, and both processes' results."""
  root = tmp_path_factory.mktemp("hf_scaleout")
  refs = {"llama": _save_llama(root / "llama", VOCAB, 0),
          "llama_odd_vocab": _save_llama(root / "llama_odd_vocab", ODD_VOCAB, 1)}
  assert (root / "llama" / "model.safetensors.index.json").is_file()
  ids = np.random.RandomState(0).randint(0, ODD_VOCAB, (2, 11))
  np.save(root / "ids.npy", ids)
  with torch.no_grad():
    hf_logits = {k: m(torch.tensor(ids)).logits.float().numpy() for k, m in refs.items()}
  results = run_pair(SCRIPT, [str(root), json.dumps(CASES), json.dumps(MESHES)],
                     devices=LOCAL_DEVICES)
  return root, hf_logits, results


def _single_process(directory):
  model = convert.load_weights(convert.model_config(directory), directory)
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _check_case(run, case):
  root, hf_logits, results = run
  name, mesh_name = CASES[case]
  for r in results:
    assert r["processes"] == 2 and r["devices"] == 2 * LOCAL_DEVICES
    assert "error" not in r[case], r[case]["error"]
  want = _single_process(root / name)
  saved = np.load(root / f"{case}.npz")
  assert set(saved.files) == set(want) | {"logits"}
  for key, value in want.items():      # the global value of every parameter
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  assert _rel(saved["logits"], hf_logits[name]) <= 1e-5

  size = {a: MESHES[mesh_name].get(a, 1) * MESHES[mesh_name].get("dcn_" + a, 1)
          for a in ("data", "fsdp", "sequence", "tensor")}
  across = MESHES[mesh_name]["dcn_fsdp" if mesh_name == "fsdp" else "dcn_tensor"]
  split = 0
  for pid, r in enumerate(results):
    assert r[case]["mesh"] == size and r[case]["unknown_reads"] == []
    assert set(r[case]["params"]) == set(want)
    for key, info in r[case]["params"].items():
      spec = (ODD_VOCAB_SPECS if case == "odd_vocab" else {}).get(
          tuple(key.split(".")[-2:]), EXPECTED_SPECS[tuple(key.split(".")[-2:])])
      assert tuple(info["spec"]) == spec, (key, info["spec"])
      # Each process read exactly the elements its own devices hold ...
      assert info["read_is_own"], (pid, key, info)
      # (each distinct piece once, however many local devices hold it)
      assert 1 <= info["reads"] <= LOCAL_DEVICES, (pid, key, info)
      if info["own"] < info["size"]:
        # ... which, for a parameter split between the processes, is its half.
        assert mesh_name in spec
        assert info["own"] * across == info["size"], (pid, key, info)
        split += 1
  assert split >= 2 * 12                 # most parameters are split between processes


def test_fsdp_across_processes(run):
  _check_case(run, "fsdp")
  # Every parameter but the q/k/v biases has an embed dimension: split between the processes.
  for r in run[2]:
    assert all(p["own"] < p["size"] for p in r["fsdp"]["params"].values()
               if p["spec"] != ["tensor"])


def test_tensor_across_processes(run):
  _check_case(run, "tensor")


def test_odd_vocab_on_a_tensor_split_mesh(run):
  assert not run[2][0]["odd_vocab"].get("error")
  _check_case(run, "odd_vocab")
