"""PEFT LoRA adapters in and out (gemkit.hf.save_adapter / load_adapter) against
peft itself on a tiny random Llama built here: logits of peft's PeftModel vs
gemkit's adapted model (LoRA, rsLoRA, DoRA, PiSSA, QLoRA, rank/alpha patterns),
one-line errors for adapters of another base, and launch.finetune --export_peft."""

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

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import gemkit  # pylint: disable=wrong-import-position
from gemkit.surgery import lora, paths, quantize  # pylint: disable=wrong-import-position
from gemkit.hf import HFError  # pylint: disable=wrong-import-position
from ops import quant  # pylint: disable=wrong-import-position
from tests.hf_models import COMMON, VOCAB, save_tiny_hf  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-5          # relative error of the logits, f32
IDS = np.random.RandomState(0).randint(3, VOCAB, (2, 13))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(HF directory, gemkit base model in f32, transformers' base logits)."""
  d = tmp_path_factory.mktemp("peft") / "llama"
  save_tiny_hf("llama", d)
  model, _, _ = gemkit.hf.load(d, dtype="float32")
  return d, model, _logits(_hf(d))


def _hf(d):
  return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _logits(model):
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


def _ours(model):
  return np.asarray(model(jnp.asarray(IDS)))


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _randomize(model, name="default", seed=1):
  """Random non-zero B (and DoRA magnitudes off the init): the adapter changes the logits."""
  key = jax.random.key(seed)
  for i, (_, w) in enumerate(lora.wrappers(model)):
    a = w.adapters[name]
    a.b[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), a.b[...].shape)
    if a.rule.dora:
      noise = jax.random.normal(jax.random.fold_in(key, 1000 + i), a.magnitude[...].shape)
      a.magnitude[...] = a.magnitude[...] * (1.0 + 0.2 * noise)
  return model


RULES = {
    "lora": {},
    "rslora": {"rslora": True},
    "dora": {"dora": True},
    "pissa": {"init": "pissa"},
}


@pytest.mark.parametrize("kind", list(RULES))
def test_gemkit_adapter_loads_in_peft_with_the_same_logits(llama, tmp_path, kind):
  d, base, base_logits = llama
  model = lora.apply_lora(nnx.clone(base), [
      {"targets": r".*attn\.(q|v)_proj", "rank": 4, "alpha": 8, **RULES[kind]},
      {"targets": r".*mlp\.down_proj", "rank": 2, "alpha": 6, **RULES[kind]}])
  _randomize(model)
  out = gemkit.hf.save_adapter(model, tmp_path / "adapter", base_name_or_path=d)
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert cfg["use_dora"] == (kind == "dora") and cfg["use_rslora"] == (kind == "rslora")
  r = 8 if kind == "pissa" else 4            # PiSSA: converted to LoRA of rank 2r
  assert cfg["r"] == r and set(cfg["rank_pattern"].values()) == {r // 2}
  assert cfg["base_model_name_or_path"] == str(d)

  ref = _logits(peft.PeftModel.from_pretrained(_hf(d), out).eval())
  ours = _ours(model)
  assert _rel(ours, ref) <= TOL, _rel(ours, ref)
  assert _rel(ref, base_logits) > 0.05          # the adapter is not a no-op
  # and back: the exported directory onto a fresh base gives the same model
  back = gemkit.hf.load_adapter(nnx.clone(base), out)
  assert _rel(_ours(back), ref) <= TOL


def test_partial_layers_and_qlora(llama, tmp_path):
  """Adapters on some layers only get full module names. A QLoRA adapter (nf4 base) is
  plain LoRA over the base's layers: peft over the dequantized nf4 weights gives gemkit's
  QLoRA logits, and over the float base gives gemkit's float base + that adapter."""
  d, base, base_logits = llama
  qmodel, _ = quantize.quantize_model(nnx.clone(base), quantize.default_rules("nf4-g32"))
  names = gemkit.hf.peft.module_names(qmodel)
  dequantized = {names[p]: np.asarray(quant.dequantize(m.quantized_weight(), jnp.float32)).T
                 for p, m in paths.dense_layers(qmodel) if m.is_quantized}
  lora.apply_lora(qmodel, {"targets": r"blocks/1/attn/(q|o)_proj", "rank": 4, "alpha": 8},
                  base_fingerprint=lora.fingerprint(base))
  _randomize(qmodel)
  out = gemkit.hf.save_adapter(qmodel, tmp_path / "qlora")
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["target_modules"] == ["model.layers.1.self_attn.o_proj",
                                   "model.layers.1.self_attn.q_proj"]
  ref = _logits(peft.PeftModel.from_pretrained(_hf(d), out).eval())
  assert _rel(_ours(gemkit.hf.load_adapter(nnx.clone(base), out)), ref) <= TOL
  assert _rel(ref, base_logits) > 0.05
  hf_nf4 = _hf(d)
  with torch.no_grad():
    for module, w in dequantized.items():
      hf_nf4.get_submodule(module).weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
  ref_nf4 = _logits(peft.PeftModel.from_pretrained(hf_nf4, out).eval())
  assert _rel(_ours(qmodel), ref_nf4) <= TOL, _rel(_ours(qmodel), ref_nf4)


PEFT_CONFIGS = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},   # unconverted: peft re-decomposes the base
    "regex_patterns_rslora": {"target_modules": r".*\.(q|o)_proj", "use_rslora": True,
                              "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"q_proj": 3}},
}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_adapter_loads_in_gemkit_with_the_same_logits(llama, tmp_path, kind):
  d, base, base_logits = llama
  torch.manual_seed(0)
  cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "gate_proj"],
         "init_lora_weights": False} | PEFT_CONFIGS[kind]
  pm = peft.get_peft_model(_hf(d), peft.LoraConfig(**cfg)).eval()
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_B" in n and kind == "pissa":
        p.add_(0.1 * torch.randn_like(p))
      if "lora_magnitude_vector" in n:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
  ref = _logits(pm)
  pm.save_pretrained(tmp_path / "adapter")
  assert _rel(ref, base_logits) > 0.05
  model = gemkit.hf.load_adapter(nnx.clone(base), tmp_path / "adapter", name="task")
  assert lora.adapter_names(model) == ["task"]
  assert _rel(_ours(model), ref) <= TOL, _rel(_ours(model), ref)


def _peft_dir(tmp_path, name, **config):
  """A PEFT adapter (q_proj, v_proj) of a tiny Llama of another shape."""
  cfg = transformers.LlamaConfig(**(COMMON | config))
  pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                           peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  pm.save_pretrained(tmp_path / name)
  return tmp_path / name


def _one_line_error(model, directory, *needles):
  with pytest.raises(HFError) as e:
    gemkit.hf.load_adapter(model, directory)
  message = str(e.value)
  assert "\n" not in message and all(n in message for n in needles), message
  assert not lora.wrappers(model)                # nothing changed


def test_adapter_of_another_base_is_one_line_naming_the_module(llama, tmp_path):
  _, base, _ = llama
  model = nnx.clone(base)
  _one_line_error(model, _peft_dir(tmp_path, "narrow", hidden_size=32),
                  "model.layers.0.self_attn.q_proj", "another base")
  _one_line_error(model, _peft_dir(tmp_path, "deeper", num_hidden_layers=3),
                  "model.layers.2.self_attn.q_proj", "does not have")
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "adapter_config.json").write_text("{}")
  (pickled / "adapter_model.bin").write_bytes(b"\x80\x04N.")
  _one_line_error(model, pickled, "adapter_model.bin", "never unpickles")
  other = _peft_dir(tmp_path, "bias")
  cfg = json.loads((other / "adapter_config.json").read_text()) | {"lora_bias": True}
  (other / "adapter_config.json").write_text(json.dumps(cfg))
  _one_line_error(model, other, "lora_bias")


def test_finetune_export_peft(llama, tmp_path):
  """launch.finetune --export_peft on the imported base: peft's PeftModel over the HF
  directory equals gemkit.load(<run>/<method>) (LoRA, and PiSSA converted to LoRA)."""
  d, _, base_logits = llama
  ft = {"model.init_from": str(d), "methods": "lora,pissa", "seeds": 1, "task.digits": 2,
        "task.train_examples": 64, "task.eval_examples": 4, "task.seq_len": 32,
        "train.steps": 3, "train.batch_size": 4, "train.log_every": 1,
        "train.warmup_steps": 1, "lora.rank": 2, "lr.lora": 0.05, "lr.pissa": 0.05}
  out = subprocess.run(
      [sys.executable, "-m", "launch.finetune", f"--workdir={tmp_path / 'ft'}",
       f"--export_peft={tmp_path / 'peft'}", *[f"--config.{k}={v}" for k, v in ft.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["method"]: r for r in json.loads((tmp_path / "ft" / "finetune.json").read_text())[
      "rows"]}
  for method in ("lora", "pissa"):
    assert rows[method]["peft_dir"] == str(tmp_path / "peft" / method)
    ref = _logits(peft.PeftModel.from_pretrained(_hf(d), tmp_path / "peft" / method).eval())
    model, _ = gemkit.load(tmp_path / "ft" / method)
    assert _rel(_ours(model), ref) <= TOL, (method, _rel(_ours(model), ref))
    assert _rel(ref, base_logits) > 0.05
