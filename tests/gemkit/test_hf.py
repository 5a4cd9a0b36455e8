"""gemkit.hf against transformers: tiny random checkpoints of every supported
decoder architecture, built and saved here (nothing is downloaded).

Each model has 2 layers, GQA, a vocabulary of 301 (not a multiple of 128),
norms and biases moved away from their initial values, a sliding window
smaller than the test sequences where the architecture has one, and a real
byte-level BPE tokenizer.json trained here.
"""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import gemkit  # pylint: disable=g-import-not-at-top,wrong-import-position
from gemkit import hf, sample  # pylint: disable=wrong-import-position
from gemkit.surgery import lora, quantize
from gemkit import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position

from tests.hf_models import (ARCHS, EOS, TEXTS, VOCAB,  # pylint: disable=wrong-import-position
                             save_tiny_hf, write_tokenizer)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (HF directory, the transformers model)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name in ARCHS:
    # llama: sharded with an index; the rest in one file.
    kw = {"max_shard_size": "40KB"} if name == "llama" else {}
    out[name] = (root / name, save_tiny_hf(name, root / name, **kw))
  return out


def _ids(batch=2, length=13, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB, (batch, length))


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_transformers(checkpoints, name):
  d, ref_model = checkpoints[name]
  model, config, tok = hf.load(d, dtype="float32")
  ids = _ids()
  assert _rel(model(jnp.asarray(ids)), _hf_logits(ref_model, ids)) <= 1e-5
  assert config.model.vocab_size == VOCAB and tok.vocab_size == VOCAB
  if name == "llama":
    assert (d / "model.safetensors.index.json").is_file()
  if name in ("mistral", "gemma2"):   # the window binds
    assert config.model.window == 6 and ids.shape[1] > 6


def test_bf16_checkpoint(tmp_path):
  ref = save_tiny_hf("qwen3", tmp_path / "f32")
  ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  write_tokenizer(tmp_path / "bf16")
  ids = _ids()
  ref_bf16 = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(   # the bf16
      tmp_path / "bf16", dtype=torch.float32).eval(), ids)               # weights in f32
  model, config, _ = hf.load(tmp_path / "bf16")
  assert config.model.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(nnx_params(model))} == {jnp.dtype("bfloat16")}
  assert _rel(model(jnp.asarray(ids)), ref_bf16) <= 2e-2
  model32, _, _ = hf.load(tmp_path / "bf16", dtype="float32")
  assert _rel(model32(jnp.asarray(ids)), ref_bf16) <= 1e-5


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_decoding_matches_generate(checkpoints, name):
  d, ref_model = checkpoints[name]
  model, _, _ = hf.load(d, dtype="float32")
  prompts = [_ids(1, 9, seed=1)[0], _ids(1, 5, seed=2)[0]]
  ours = sample.generate_ids(model, prompts, max_new_tokens=16, eos_ids=(EOS,), pad_id=0)
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      out = ref_model.generate(torch.tensor(prompt)[None], do_sample=False,
                               max_new_tokens=16, eos_token_id=EOS, pad_token_id=0)
    theirs = out[0, len(prompt):].numpy()
    np.testing.assert_array_equal(row[:len(theirs)], theirs)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "llama_tied_bias"])
def test_export_round_trip(checkpoints, name, tmp_path):
  d, ref_model = checkpoints[name]
  model, config, tok = hf.load(d, dtype="float32")
  out = hf.save(model, config, tmp_path / "out", tokenizer=tok)
  exported = json.loads((out / "config.json").read_text())
  assert exported["architectures"] == [type(ref_model).__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = _ids()
  assert _rel(_hf_logits(reloaded, ids), _hf_logits(ref_model, ids)) <= 1e-5
  again, _, _ = hf.load(out, dtype="float32")
  chex.assert_trees_all_close(jax.tree.leaves(nnx_params(again)),
                              jax.tree.leaves(nnx_params(model)), rtol=0, atol=0)


def nnx_params(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_export_gemkit_trained_transformer_with_byte_tokenizer(tmp_path):
  """A gemkit transformer (sqrt(d) embeddings, RMSNorm w, SwiGLU, tied) goes out
  as Gemma with SiLU and norm weights w - 1, with the byte tokenizer's
  tokenizer.json."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config().model
  model = models.build(cfg, rngs=nnx.Rngs(3))
  for _, m in nnx.iter_modules(model):   # norms away from 1
    if hasattr(m, "scale") and isinstance(m.scale, nnx.Param):
      m.scale[...] = m.scale[...] + 0.2 * jax.random.normal(jax.random.key(1), m.scale.shape)
  out = hf.save(model, {"model": cfg}, tmp_path / "out",
                tokenizer=tokenizer_lib.ByteTokenizer())
  ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(ref).__name__ == "GemmaForCausalLM"
  ids = np.random.RandomState(0).randint(0, 256, (2, 11))
  assert _rel(model(jnp.asarray(ids)), _hf_logits(ref, ids)) <= 1e-5
  auto = transformers.AutoTokenizer.from_pretrained(out)
  text = TEXTS[2] + TEXTS[4]
  assert auto(text, add_special_tokens=False)["input_ids"] == list(
      tokenizer_lib.ByteTokenizer().encode(text))


def test_export_merges_lora(checkpoints, tmp_path):
  d, _ = checkpoints["qwen2"]
  model, config, tok = hf.load(d, dtype="float32")
  lora.apply_lora(model, {"targets": r".*(q_proj|v_proj|down_proj)", "rank": 4}, seed=1)
  for _, w in lora.wrappers(model):             # B = 0 at init: make the adapters count
    for a in w.adapters.values():
      a.b[...] = 0.05 * jax.random.normal(jax.random.key(2), a.b.shape)
  ids = _ids()
  adapted = np.asarray(model(jnp.asarray(ids)))
  out = hf.save(model, config, tmp_path / "merged", tokenizer=tok)
  merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert _rel(_hf_logits(merged, ids), adapted) <= 1e-5
  assert lora.wrappers(model) and not any(w.merged for _, w in lora.wrappers(model))


def test_tokenizer_matches_auto_tokenizer(checkpoints):
  d, _ = checkpoints["llama"]
  auto = transformers.AutoTokenizer.from_pretrained(d)
  tok = tokenizer_lib.HFTokenizer.from_dir(d)
  for text in TEXTS:
    ids = tok.encode(text)
    assert list(ids) == auto(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)


def test_quantized_and_lora_models_run_the_pallas_kernels(checkpoints):
  """Mistral (sliding window: block-sparse attention) through the TPU Pallas
  kernels in interpret mode: float, int4-quantized and QLoRA-wrapped."""
  d, ref_model = checkpoints["mistral"]
  cfg = hf.model_config(d, dtype="float32") | {"attention_impl": "pallas_tpu"}
  model = hf.load_weights(cfg, d)
  ids = _ids(2, 16)
  ref = _hf_logits(ref_model, ids)
  assert _rel(model(jnp.asarray(ids)), ref) <= 1e-5
  rules = {r".*(proj)": "int4-g8"}
  q_kernel, _ = quantize.quantize_model(model, rules, impl="pallas_tpu")
  q_xla, _ = quantize.quantize_model(model, rules, impl="xla")
  logits_q = np.asarray(q_kernel(jnp.asarray(ids)))
  assert _rel(logits_q, np.asarray(q_xla(jnp.asarray(ids)))) <= 1e-5
  assert 0 < _rel(logits_q, ref) < 0.2
  lora.apply_lora(q_kernel, {"targets": r".*(q_proj|v_proj)", "rank": 4}, seed=0)
  np.testing.assert_allclose(np.asarray(q_kernel(jnp.asarray(ids))), logits_q, rtol=1e-5,
                             atol=1e-5)   # B = 0 at init: the adapted model is its base


def test_sparse_attention_pattern_on_an_imported_model(checkpoints):
  """A run's ``attention=topk`` on an imported Llama: with top_k + local + sink
  blocks covering the whole sequence, it is dense attention, so the logits
  are transformers' (and the prefill + cache decode path runs the op too)."""
  d, ref_model = checkpoints["llama"]
  cfg = hf.resolve_model_config({"init_from": str(d), "attention": "topk", "top_k": 2,
                                 "block_size": 4, "topk_scores": "quest",
                                 "dtype": "float32", "param_dtype": "float32"})
  assert cfg.attention == "topk" and cfg.rope_type == "llama3"
  model = hf.load_weights(cfg, d)
  ids = _ids(2, 13)
  ref = _hf_logits(ref_model, ids)
  assert _rel(model(jnp.asarray(ids)), ref) <= 1e-5
  cache = model.init_cache(2, 16)
  logits, cache = model.decode(jnp.asarray(ids[:, :12]), cache)
  step, _ = model.decode(jnp.asarray(ids[:, 12:]), cache)
  assert _rel(jnp.concatenate([logits, step], 1), ref) <= 1e-5


def test_gemkit_load_accepts_an_hf_directory(checkpoints):
  d, ref_model = checkpoints["gemma"]
  model, config = gemkit.load(d)
  assert config.model.family == "transformer" and config.model.norm_offset == 1.0
  ids = _ids()
  assert _rel(model(jnp.asarray(ids)), _hf_logits(ref_model, ids)) <= 1e-5


# --- bad input: one line naming the file, tensor or key --------------------------------


def _one_line(excinfo, *needles):
  message = str(excinfo.value)
  assert "\n" not in message
  for n in needles:
    assert n in message, message


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return dst


def test_errors_name_the_file_tensor_or_key(checkpoints, tmp_path):
  d, _ = checkpoints["qwen2"]
  with pytest.raises(hf.HFError) as e:
    hf.load(tmp_path)
  _one_line(e, "config.json")

  bad = _copy(d, tmp_path / "arch")
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(cfg | {"architectures": ["FooForCausalLM"]}))
  with pytest.raises(hf.HFError) as e:
    hf.load(bad)
  _one_line(e, "FooForCausalLM", "LlamaForCausalLM", "Gemma2ForCausalLM")

  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  missing = _copy(d, tmp_path / "missing")
  tensors = load_file(missing / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, missing / "model.safetensors")
  with pytest.raises(hf.HFError) as e:
    hf.load(missing)
  _one_line(e, "model.layers.1.mlp.up_proj.weight", "missing")

  shape = _copy(d, tmp_path / "shape")
  tensors = load_file(shape / "model.safetensors")
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
  save_file(tensors, shape / "model.safetensors")
  with pytest.raises(hf.HFError) as e:
    hf.load(shape)
  _one_line(e, "model.layers.0.self_attn.k_proj.weight", "[8, 64]", "[48, 64]")

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((d / "config.json").read_text())
  (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
  write_tokenizer(pickled)
  with pytest.raises(hf.HFError) as e:
    hf.load(pickled)
  _one_line(e, "pytorch_model.bin", "safetensors")

  no_tok = _copy(d, tmp_path / "no_tok")
  (no_tok / "tokenizer.json").unlink()
  with pytest.raises(Exception) as e:
    hf.load(no_tok)
  _one_line(e, "tokenizer.json", str(no_tok))
