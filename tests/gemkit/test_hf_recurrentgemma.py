"""gemkit.hf's RecurrentGemmaForCausalLM <-> models.griffin against transformers.

Tiny random checkpoints built and saved here (nothing is downloaded): 4 layers
with block_types ["recurrent", "recurrent", "attention"] (so R R A R: both
block kinds and the cyclic pattern), a vocabulary of 301 (not a multiple of
128), GQA (or MQA), an lru_width other than hidden_size, a local-attention
window of 5 (shorter than the test sequences), and norms, biases, the
convolution, the gates and recurrent_param moved away from their initial
values.
"""

import dataclasses
import json
import math
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gemkit import hf  # pylint: disable=wrong-import-position
from gemkit.surgery import quantize  # pylint: disable=wrong-import-position
from gemkit.hf import architectures, convert  # pylint: disable=wrong-import-position
from models import griffin  # pylint: disable=wrong-import-position

VOCAB = 301
EOS = 300
WINDOW = 5
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, lru_width=64, attention_window_size=WINDOW,
              conv1d_width=4, block_types=["recurrent", "recurrent", "attention"],
              bos_token_id=2, eos_token_id=EOS, pad_token_id=0)
CONFIGS = {
    "gqa_tied": dict(num_key_value_heads=2, attention_bias=True),
    "mqa_untied": dict(num_key_value_heads=1, attention_bias=False, tie_word_embeddings=False,
                       lru_width=None, logits_soft_cap=5.0,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                        "partial_rotary_factor": 0.5}),
}


def _perturb(model) -> None:
  """Norms, biases, conv, gates and recurrent_param away from their init (zeros,
  or weights with variance 0.01 / fan-in)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("norm" in name or name.endswith("bias") or "recurrent_param" in name
          or "conv_1d" in name):
        p.add_(torch.randn_like(p) * 0.3)
      elif "gate_weight" in name:
        p.add_(torch.randn_like(p) * 0.2)


def _save_hf(name: str, directory: pathlib.Path):
  torch.manual_seed(sum(map(ord, name)))
  cfg = transformers.RecurrentGemmaConfig(**(COMMON | CONFIGS[name]))
  model = transformers.RecurrentGemmaForCausalLM(cfg).eval()
  _perturb(model)
  model.save_pretrained(directory)   # safetensors
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (HF directory, the transformers model)."""
  root = tmp_path_factory.mktemp("rg")
  return {name: (root / name, _save_hf(name, root / name)) for name in CONFIGS}


def _load(d):
  cfg = convert.model_config(d, dtype="float32")
  return convert.load_weights(cfg, d), cfg


def _ids(batch=2, length=13, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB - 1, (batch, length))


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids), use_cache=False).logits.float().numpy()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_forward = nnx.jit(lambda m, tok: m(tok))
_decode = nnx.jit(lambda m, tok, cache, n: m.decode(tok, cache, n))


def _greedy(model, prompts, steps):
  """gemkit's recurrent-state decode: ragged prefill (right-padded, num_valid),
  then one token per step; greedy ids [B, steps]."""
  P = max(len(p) for p in prompts)
  tok = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tok[i, :len(p)] = p
  n = jnp.asarray([len(p) for p in prompts], jnp.int32)
  logits, cache = _decode(model, jnp.asarray(tok), model.init_cache(len(prompts), 64), n)
  nxt = jnp.take_along_axis(logits, (n - 1)[:, None, None], axis=1)[:, 0].argmax(-1)
  out = [nxt]
  for _ in range(steps - 1):
    logits, cache = _decode(model, nxt[:, None], cache, jnp.ones_like(n))
    nxt = logits[:, 0].argmax(-1)
    out.append(nxt)
  return np.asarray(jnp.stack(out, 1))


# --- import -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name):
  d, ref_model = checkpoints[name]
  model, cfg = _load(d)
  ids = _ids(2, 17)
  assert ids.shape[1] > WINDOW == cfg["window"]     # the window binds
  ref = _hf_logits(ref_model, ids)
  err = _rel(_forward(model, jnp.asarray(ids)), ref)
  assert err <= 1e-5, err
  hf_cfg = ref_model.config
  assert cfg["family"] == "griffin" and cfg["block_pattern"] == "RRA"
  assert [b for b in griffin.GriffinConfig.from_config(cfg).block_types] == [
      "R" if t == "linear_attention" else "A" for t in hf_cfg.layers_block_type]
  assert cfg["vocab_size"] == VOCAB and cfg["num_kv_heads"] == hf_cfg.num_key_value_heads
  assert cfg["lru_width"] == hf_cfg.lru_width and cfg["mlp_dim"] == 48
  assert cfg["embed_scale"] == float(torch.tensor(48 ** 0.5, dtype=torch.bfloat16))
  assert cfg["embed_scale"] != math.sqrt(48)        # the bf16 normaliser, not sqrt(d)
  assert cfg["rope_fraction"] == 0.5 and cfg["tie_embeddings"] == hf_cfg.tie_word_embeddings


def test_greedy_decoding_matches_generate(checkpoints):
  """Ragged prompts (9 and 5 tokens) through gemkit's ring-buffer / RG-LRU state
  decode, against transformers' generate on each prompt alone, past the window."""
  d, ref_model = checkpoints["gqa_tied"]
  model, _ = _load(d)
  prompts = [_ids(1, 9, seed=1)[0], _ids(1, 5, seed=2)[0]]
  ours = _greedy(model, prompts, 16)
  compared = 0
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      out = ref_model.generate(torch.tensor(prompt)[None], do_sample=False,
                               max_new_tokens=16, eos_token_id=EOS, pad_token_id=0)
    theirs = out[0, len(prompt):].numpy()      # up to transformers' stop at EOS
    np.testing.assert_array_equal(row[:len(theirs)], theirs)
    compared += len(theirs)
  assert compared >= 24, compared            # EOS did not cut the comparison short


# --- export -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip(checkpoints, name, tmp_path):
  d, ref_model = checkpoints[name]
  model, cfg = _load(d)
  assert architectures.for_model(griffin.GriffinConfig.from_config(cfg)).name == \
      "RecurrentGemmaForCausalLM"
  out = hf.save(model, {"model": cfg}, tmp_path / "out")
  exported = json.loads((out / "config.json").read_text())
  assert exported["architectures"] == ["RecurrentGemmaForCausalLM"]
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  names = lambda p: set(safe_open(str(p / "model.safetensors"), "np").keys())
  assert names(out) == names(d)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = _ids(2, 17, seed=3)
  ref = _hf_logits(ref_model, ids)
  assert _rel(_hf_logits(reloaded, ids), ref) <= 1e-5
  again, cfg_again = _load(out)
  assert {k: v for k, v in cfg_again.items() if k != "init_from"} == {
      k: v for k, v in cfg.items() if k != "init_from"}
  chex.assert_trees_all_close(jax.tree.leaves(nnx.to_pure_dict(nnx.state(again, nnx.Param))),
                              jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                              rtol=0, atol=0)
  assert _rel(_forward(again, jnp.asarray(ids)), ref) <= 1e-5


def test_export_gemkit_griffin(tmp_path):
  """A gemkit-built Griffin (RMSNorm w with offset 0, every head dim rotated) that
  RecurrentGemma can express goes out with norm weights w - 1 and
  partial_rotary_factor 1.0; transformers computes the same logits."""
  d = 32
  cfg = griffin.GriffinConfig(
      vocab_size=VOCAB, num_layers=3, d_model=d, num_heads=2, num_kv_heads=2, head_dim=16,
      mlp_dim=40, window=WINDOW, lru_width=24,
      embed_scale=architectures._bf16(math.sqrt(d)),  # pylint: disable=protected-access
      mlp_bias=True, recurrent_bias=True, out_bias=True)
  model = griffin.Griffin(cfg, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.key(2), 1000))
  for _, m in nnx.iter_modules(model):      # norms and biases away from 1 / 0
    for attr in ("scale", "bias"):
      p = getattr(m, attr, None)
      if isinstance(p, nnx.Param):
        p[...] = p[...] + 0.2 * jax.random.normal(next(keys), p.shape)
  block = {"family": "griffin"} | dataclasses.asdict(cfg)
  out = hf.save(model, block, tmp_path / "out")
  exported = json.loads((out / "config.json").read_text())
  assert exported["rope_parameters"]["partial_rotary_factor"] == 1.0
  ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(ref).__name__ == "RecurrentGemmaForCausalLM"
  ids = _ids(2, 11, seed=4)
  assert _rel(_forward(model, jnp.asarray(ids)), _hf_logits(ref, ids)) <= 1e-5


def test_export_refuses_what_recurrentgemma_cannot_express(tmp_path):
  """gemkit's default Griffin: sqrt(d) embeddings (not bf16-rounded), no biases."""
  cfg = griffin.GriffinConfig(vocab_size=VOCAB, num_layers=3, d_model=32, num_heads=2,
                              head_dim=16, mlp_dim=40, window=WINDOW)
  model = griffin.Griffin(cfg, rngs=nnx.Rngs(0))
  block = {"family": "griffin"} | dataclasses.asdict(cfg)
  with pytest.raises(ValueError, match="RecurrentGemmaForCausalLM scales embeddings by "
                     "bf16\\(sqrt\\(d\\)\\)"):
    hf.save(model, block, tmp_path / "out")
  fixed = {**block, "embed_scale": 5.65625}
  with pytest.raises(ValueError, match="RecurrentGemmaForCausalLM always has mlp_bias"):
    hf.save(griffin.Griffin(griffin.GriffinConfig.from_config(fixed), rngs=nnx.Rngs(0)),
            fixed, tmp_path / "out2")


# --- quantized ----------------------------------------------------------------------------


def test_int4_quantized_copy_runs_and_stays_close(checkpoints):
  d, ref_model = checkpoints["gqa_tied"]
  model, _ = _load(d)
  ids = _ids(2, 17, seed=5)
  ref = _hf_logits(ref_model, ids)
  qmodel, report = quantize.quantize_model(model, {r".*": "int4-g16"}, impl="xla")
  paths = {r.path for r in report}
  assert "blocks/0/mixer/linear_x" in paths and "blocks/2/mixer/attn/q_proj" in paths
  assert "blocks/3/mlp/down_proj" in paths
  logits_q = np.asarray(_forward(qmodel, jnp.asarray(ids)))
  err = _rel(logits_q, ref)
  assert 0 < err < 0.2, err
  # The quantized model decodes with its recurrent state as its forward pass does.
  cache = qmodel.init_cache(2, 64)
  steps, _ = _decode(qmodel, jnp.asarray(ids), cache, jnp.full((2,), 17, jnp.int32))
  assert _rel(steps, logits_q) <= 1e-5
  assert _rel(_forward(model, jnp.asarray(ids)), ref) <= 1e-5   # the float model untouched


# --- bad config.json: one line naming config.json and the key -----------------------------


@pytest.mark.parametrize("key,value,needle", [
    ("block_types", ["recurrent", "mlp"], "block_types"),
    ("hidden_activation", "relu", "hidden_activation"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
     "rope_parameters"),
    ("logits_soft_cap", None, "logits_soft_cap"),
])
def test_unsupported_config_key_is_one_line(checkpoints, tmp_path, key, value, needle):
  d, _ = checkpoints["gqa_tied"]
  bad = tmp_path / "bad"
  shutil.copytree(d, bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(cfg | {key: value}))
  with pytest.raises(hf.HFError) as e:
    convert.model_config(bad, dtype="float32")
  message = str(e.value)
  assert "\n" not in message and "config.json" in message and needle in message, message
