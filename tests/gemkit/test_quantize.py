"""gemkit.surgery.quantize: format specs, regex rules over module paths, quantized logits vs
float, the int4 storage target, training through a quantized base, and
launch.quantize end to end (quantized run dirs that gemkit.load and sampling read)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemkit
import models
from gemkit import runs, sample, train
from gemkit.surgery import paths, quantize
from gemkit.studies import quantize as quantize_study
from gemkit.config import ConfigError
from models import layers
from tests.helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
WIDE = {"model.d_model": 128, "model.mlp_dim": 256, "model.head_dim": 32}  # K >= 128


def _model(**overrides):
  return models.build(tiny_config(**overrides).model, rngs=nnx.Rngs(0))


def _tokens():
  return jax.random.randint(jax.random.key(0), (2, 24), 0, 256)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("text,name,fields", [
    ("int8", "int8", dict(fmt="int8", group_size=None)),
    ("int4", "int4-g128", dict(fmt="int4", group_size=128, symmetric=True)),
    ("INT4-g64-asym", "int4-g64-asym", dict(group_size=64, symmetric=False)),
    ("nf4", "nf4-g64", dict(fmt="nf4", group_size=64, double_quant=False)),
    ("nf4-g128-dq", "nf4-g128-dq", dict(group_size=128, double_quant=True)),
    ("fp4-dq", "fp4-g64-dq", dict(fmt="fp4", double_quant=True)),
    ("fp8", "fp8", dict(fmt="fp8", act_fmt=None)),
    ("ternary", "ternary", dict(fmt="ternary", group_size=None)),
    ("w8a8", "w8a8", dict(fmt="int8", act_fmt="int8", outlier_threshold=None)),
    ("w8a8-int8", "w8a8", dict(fmt="int8", act_fmt="int8")),
    ("int8-a8", "w8a8", dict(fmt="int8", act_fmt="int8")),
    ("w8a8-llm.int8", "w8a8-llm.int8", dict(act_fmt="int8", outlier_threshold=6.0)),
    ("w8a8-llm.int8=4", "w8a8-llm.int8=4", dict(outlier_threshold=4.0)),
    ("w8a8-fp8", "w8a8-fp8", dict(fmt="fp8", act_fmt="fp8")),
    ("int4-g256-a8", "int4-g256-a8", dict(fmt="int4", group_size=256, act_fmt="int8")),
])
def test_spec_parsing_and_canonical_names(text, name, fields):
  spec = quantize.QuantSpec.parse(text)
  assert spec.name == name and quantize.QuantSpec.parse(spec.name) == spec
  for k, v in fields.items():
    assert getattr(spec, k) == v, k


@pytest.mark.parametrize("text,match", [
    ("int3", "unknown format 'int3'"), ("int4-g12x", "unknown option 'g12x'"),
    ("int8-llm.int8", "llm.int8 needs int8 activations"), ("", "non-empty string"),
])
def test_spec_errors_name_the_problem(text, match):
  with pytest.raises(ValueError, match=match):
    quantize.QuantSpec.parse(text)


def test_rules_select_layers_by_full_regex_match_first_rule_wins():
  model = _model()
  rules = [(r"blocks/0/attn/(q|k)_proj", "int8"),
           (r"blocks/1/.*", None),             # block 1 stays float ...
           (r".*/mlp/.*", "nf4-g32"),          # ... so this only reaches block 0's MLP
           (r"blocks/0/attn/v", "fp8")]        # full match: 'v' alone is no layer
  with pytest.raises(ValueError, match=r"\['blocks/0/attn/v'\] matched no Dense layer"):
    quantize.quantize_model(model, rules)
  q, report = quantize.quantize_model(model, rules[:3])
  got = {p: d.quant_layout[0] for p, d in paths.dense_layers(q) if d.is_quantized}
  assert got == {"blocks/0/attn/q_proj": "int8", "blocks/0/attn/k_proj": "int8",
                 "blocks/0/mlp/gate_proj": "nf4", "blocks/0/mlp/up_proj": "nf4",
                 "blocks/0/mlp/down_proj": "nf4"}
  assert sorted(r.path for r in report) == sorted(got)
  assert all(not d.is_quantized for _, d in paths.dense_layers(model))  # input untouched
  assert "blocks/0/mlp/down_proj" in quantize.format_layers(report)
  # A dict works too; the (absent) untied head is kept float by default_rules.
  q2, _ = quantize.quantize_model(model, dict(quantize.default_rules("int8")))
  assert all(d.is_quantized for _, d in paths.dense_layers(q2))


def test_rule_errors_name_the_layer():
  with pytest.raises(ValueError, match=r"blocks/0/attn/k_proj \[64, 32\] -> 'int4-g128'.*"
                                       r"group_size=128"):
    quantize.quantize_model(_model(), quantize.default_rules("int4"))
  with pytest.raises(ValueError, match="rule regex"):
    quantize.parse_rules([("(", "int8")])
  with pytest.raises(ValueError, match="down_proj .*act_fmt='int8' needs one weight scale"):
    quantize.quantize_model(_model(**WIDE), quantize.default_rules("int4-g128-a8"))


# Relative error of the logits of a freshly initialised model (unit-scale logits).
# (fp8, fp4, ternary, W8A8-fp8: layer level in tests/models/test_quantized_dense.py)
LOGIT_TOL = {"int8": 3e-2, "w8a8": 4e-2, "int4-g128": 0.3, "nf4-dq": 0.25}


def test_quantized_model_logits_close_to_float_per_format():
  model = _model(**WIDE)
  tokens = _tokens()
  ref = model(tokens)
  errs = {}
  for fmt, tol in LOGIT_TOL.items():
    q, _ = quantize.quantize_model(model, quantize.default_rules(fmt))
    errs[fmt] = _rel(q(tokens), ref)
    assert np.isfinite(errs[fmt]) and errs[fmt] < tol, (fmt, errs[fmt])
  assert errs["int8"] < errs["w8a8"] < errs["nf4-dq"] < errs["int4-g128"]
  # LLM.int8() with a threshold that catches columns is closer than plain W8A8.
  q, _ = quantize.quantize_model(model, quantize.default_rules("w8a8-llm.int8=1"))
  assert _rel(q(tokens), ref) < errs["w8a8"]


def test_int4_g128_storage_is_at_most_0_27x_bf16_on_a_model():
  q, report = quantize.quantize_model(_model(**WIDE), quantize.default_rules("int4-g128"))
  stored = sum(d.quantized_weight().nbytes for _, d in paths.dense_layers(q))
  bf16 = sum(2 * r.shape[0] * r.shape[1] for r in report)
  assert len(report) == 14 and stored == sum(r.quant_bytes for r in report)
  assert stored / bf16 <= 0.27, stored / bf16


def test_training_through_a_quantized_base():
  q, _ = quantize.quantize_model(_model(), quantize.default_rules("nf4-g32"))
  graphdef, params, frozen = train.split_model(q)
  assert not any("quantized" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(params))
  assert jax.tree.leaves(nnx.to_pure_dict(nnx.state(q, layers.QuantizedKernel)))
  tokens = _tokens()

  def loss(params):
    logits = train.merge_model(graphdef, params, frozen)(tokens[:, :-1])
    return jnp.mean(train.token_nll(logits, tokens[:, 1:]))
  grads = jax.jit(jax.grad(loss))(params)
  g = grads["embed"]["embedding"]        # reaches the embedding through every quantized Dense
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  assert np.abs(grads["blocks"][0]["attn_norm"]["scale"]).max() > 0


SHARDED = """
import json
import jax, numpy as np
from flax import nnx
from gemkit import sharding
from models import layers
from tests.helpers import tiny_config
mesh = sharding.make_mesh(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}).mesh)
x = jax.random.normal(jax.random.key(0), (4, 16, 128))
out = []
for kw in [dict(fmt="nf4", double_quant=True), dict(fmt="int8", act_fmt="int8",
                                                    outlier_threshold=2.0)]:
  d = layers.Dense(128, 256, names=("embed", "mlp"), rngs=nnx.Rngs(0))
  d.quantize(**kw)
  graphdef, state = nnx.split(d)
  state = jax.device_put(state, sharding.param_shardings(state, mesh))  # as Trainer does
  with sharding.activate(mesh):
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  q = state["quantized"]
  out.append([list(q["values"][...].sharding.spec), list(q["scales"][...].sharding.spec),
              float(np.abs(np.asarray(y) - np.asarray(d(x))).max())])
print(json.dumps(out))
"""


def test_quantized_state_shards_by_logical_names_on_a_mesh():
  out = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu",
                                XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert out.returncode == 0, out.stderr[-3000:]
  for values, scales, err in json.loads(out.stdout.splitlines()[-1]):
    assert values == ["fsdp", "tensor"] and scales == [None, "tensor"]   # [K(/2), N], [K/G, N]
    assert err < 1e-5


# --- launch.quantize end to end on a tiny trained run ------------------------------

FORMATS = ["int4-g32-asym", "w8a8-llm.int8"]
# Mixed precision covering every storage field: zero points, int8 double-quant
# scales, float8_e4m3fn values; one layer kept float.
MIXED = [(r"blocks/0/attn/o_proj", None), (r".*attn/.*", "int4-g32-asym"),
         (r"blocks/0/.*", "nf4-dq"), (r".*", "w8a8-fp8")]


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.quantize", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("quant")
  trainer = train.Trainer(tiny_config(tmp, **{"train.steps": 2}), tmp / "run")
  trainer.run()
  trainer.close()
  out = _launch(f"--workdir={tmp / 'run'}", f"--formats={','.join(FORMATS)}",
                "--eval_windows=4")
  assert out.returncode == 0, out.stderr[-3000:]
  return tmp, out.stdout


def test_launch_prints_table_writes_json_and_quantized_run_dirs(quantized):
  tmp, stdout = quantized
  assert "d_bpb" in stdout and "w8a8-llm.int8" in stdout
  report = json.loads((tmp / "run_quant" / "quantize.json").read_text())
  rows = {r["format"]: r for r in report["rows"]}
  assert list(rows) == ["float"] + FORMATS and report["step"] == 2
  for fmt in FORMATS:
    r = rows[fmt]
    assert r["quantized_layers"] == "14/14" and r["disk_bytes"] > 0
    assert r["dense_bytes"] < rows["float"]["dense_bytes"]
    assert abs(r["bpb_rel_change"]) < 0.05 and np.isfinite(r["heldout_bpb"])
    assert len(report["layers"][fmt]) == 14
  assert rows["int4-g32-asym"]["dense_vs_bf16"] < 0.35 < rows["w8a8-llm.int8"]["dense_vs_bf16"]
  # The loaded quantized run scores exactly what the launcher reported.
  model, config = runs.load(tmp / "run_quant" / "int4-g32-asym")
  assert sum(d.is_quantized for _, d in paths.dense_layers(model)) == 14
  ev = quantize_study.heldout_bpb(model, config, max_windows=4)
  assert ev["bpb"] == pytest.approx(rows["int4-g32-asym"]["heldout_bpb"], rel=1e-6)


def test_quantized_checkpoint_round_trip_gives_identical_logits_and_samples(quantized):
  tmp, _ = quantized
  result = quantize_study.quantize_run(runs.load_source(tmp / "run"), [("mixed", MIXED)],
                                       out_dir=tmp / "mixed", eval_windows=1,
                                       log=lambda _: None)
  assert result["rows"][1]["quantized_layers"] == "13/14"
  float_model, _ = runs.load(tmp / "run")
  expected, _ = quantize.quantize_model(float_model, MIXED)
  loaded, config = gemkit.load(tmp / "mixed" / "mixed")
  assert config is not None
  fmts = {p: d.quant_layout[0] if d.is_quantized else None
          for p, d in paths.dense_layers(loaded)}
  assert fmts == {p: d.quant_layout[0] if d.is_quantized else None
                  for p, d in paths.dense_layers(expected)}
  assert fmts["blocks/0/attn/o_proj"] is None and fmts["blocks/1/mlp/up_proj"] == "fp8"
  logits = nnx.jit(lambda m, t: m(t))   # one compilation: both have the same graph
  np.testing.assert_array_equal(np.asarray(logits(loaded, _tokens())),
                                np.asarray(logits(expected, _tokens())))
  # Sampling (KV-cache decode through the quantized layers) matches too.
  kw = dict(max_new_tokens=6, temperature=0.0)
  assert sample.generate(loaded, ["def "], **kw) == sample.generate(expected, ["def "], **kw)


def test_launch_errors_are_one_line(quantized):
  tmp, _ = quantized
  out = _launch(f"--workdir={tmp / 'run'}", "--formats=int4-g7x")
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert "config error: formats: spec 'int4-g7x': unknown option 'g7x'" in lines[0]
  with pytest.raises(ConfigError, match="out_dir: .*already holds checkpoints"):
    quantize_study.quantize_run(runs.load_source(tmp / "run"), ["int8"])   # run_quant exists
  # A format that does not fit a layer is refused before any evaluation.
  with pytest.raises(ConfigError, match=r"int4-g128: blocks/0/attn/k_proj \[64, 32\]"):
    quantize_study.quantize_run(runs.load_source(tmp / "run"), ["int4-g128"], save=False)
