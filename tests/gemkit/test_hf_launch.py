"""The launchers on a Hugging Face directory: continued pretraining, export,
generate, evaluate (``model.init_from`` / ``--checkpoint=hf_dir``), and
QLoRA fine-tuning and quantization from the imported base."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gemkit  # pylint: disable=wrong-import-position
from gemkit import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from tests.helpers import TINY, write_corpus  # pylint: disable=wrong-import-position
from tests.hf_models import TEXTS, VOCAB, save_tiny_hf  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[2]


def _launch(module, *args, timeout=600):
  out = subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(HF directory, transformers model, text corpus paths)."""
  tmp = tmp_path_factory.mktemp("hf_launch")
  model = save_tiny_hf("llama", tmp / "llama")
  return tmp / "llama", model, write_corpus(tmp, n_docs=12)


def _logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_train_from_hf_records_the_tokenizer_and_exports_back(llama, tmp_path):
  """Two steps at lr 1e-12 (the weights stay the import's): the run rebuilds to
  transformers' logits, records the HF tokenizer, and exports back."""
  d, ref, corpus = llama
  run = tmp_path / "run"
  values = {**TINY, "train.steps": 2, "train.lr": 1e-12, "train.checkpoint_every": 2,
            "data.source": "text", "data.path": corpus, "data.heldout_fraction": 0.2,
            "model.init_from": str(d)}
  _launch("train", f"--workdir={run}", *[f"--config.{k}={v}" for k, v in values.items()])
  model, config = gemkit.load(run)
  assert config.model.vocab_size == VOCAB and config.model.rope_type == "llama3"
  tok = tokenizer_lib.for_run(run)
  assert tok.vocab_size == VOCAB and list(tok.encode(TEXTS[0])) == list(
      tokenizer_lib.HFTokenizer.from_dir(d).encode(TEXTS[0]))
  ids = np.random.RandomState(0).randint(3, VOCAB, (2, 11))
  assert _rel(model(jnp.asarray(ids)), _logits(ref, ids)) <= 1e-5

  out = tmp_path / "exported"
  _launch("export", f"--checkpoint={run}", f"--out={out}")
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert _rel(_logits(exported, ids), _logits(ref, ids)) <= 1e-5
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert auto(TEXTS[1], add_special_tokens=False)["input_ids"] == list(tok.encode(TEXTS[1]))


def test_generate_and_evaluate_on_the_directory(llama, tmp_path):
  d, ref, _ = llama
  stdout = _launch("generate", f"--checkpoint={d}", "--prompt=The quick",
                   "--max_new_tokens=6")
  prompt = tokenizer_lib.HFTokenizer.from_dir(d).encode("The quick", bos=True)
  with torch.no_grad():
    ids = ref.generate(torch.tensor(prompt)[None], do_sample=False, max_new_tokens=6,
                       eos_token_id=2, pad_token_id=0)[0, len(prompt):].numpy()
  expected = tokenizer_lib.HFTokenizer.from_dir(d).decode(ids[ids != 2])
  assert stdout.startswith("The quick" + expected)

  task = tmp_path / "mc.jsonl"
  task.write_text("\n".join(json.dumps(
      {"type": "multiple_choice", "context": "The quick brown", "choices": [c, "zz"],
       "gold": 0}) for c in (" fox", " dog")) + "\n")
  report = tmp_path / "report.json"
  _launch("evaluate", f"--checkpoint={d}", f"--tasks={task}", f"--output={report}",
          "--plots_dir=")
  rows = json.loads(report.read_text())["results"]
  assert rows[0]["n"] == 2 and 0.0 <= rows[0]["metrics"]["acc"] <= 1.0


def test_qlora_finetune_and_quantize_from_the_directory(llama, tmp_path):
  d, _, corpus = llama
  ft = {"model.init_from": str(d), "methods": "qlora", "seeds": 1, "task.digits": 2,
        "task.train_examples": 64, "task.eval_examples": 8, "task.seq_len": 32,
        "train.steps": 2, "train.batch_size": 4, "train.log_every": 1,
        "train.warmup_steps": 1, "lora.rank": 2, "qlora.base_format": "nf4-g32"}
  _launch("finetune", f"--workdir={tmp_path / 'ft'}", *[f"--config.{k}={v}"
                                                         for k, v in ft.items()])
  rows = {r["method"]: r for r in json.loads(
      (tmp_path / "ft" / "finetune.json").read_text())["rows"]}
  assert set(rows) == {"base", "qlora"} and np.isfinite(rows["qlora"]["heldout_loss"])
  model, _ = gemkit.load(tmp_path / "ft" / "qlora")
  assert np.isfinite(np.asarray(model(jnp.ones((1, 8), jnp.int32)))).all()

  q = {"model.init_from": str(d), "data.source": "text", "data.path": corpus,
       "data.seq_len": 32, "data.heldout_fraction": 0.2, "train.batch_size": 4}
  _launch("quantize", "--formats=int8,int4-g32", "--eval_windows=2",
          f"--out_dir={tmp_path / 'quant'}", *[f"--config.{k}={v}" for k, v in q.items()])
  report = json.loads((tmp_path / "quant" / "quantize.json").read_text())
  bpb = {r["format"]: r["heldout_bpb"] for r in report["rows"]}
  assert set(bpb) == {"float", "int8", "int4-g32"} and abs(bpb["int8"] / bpb["float"] - 1) < 0.02
  qmodel, _ = gemkit.load(tmp_path / "quant" / "int4-g32")
  assert tokenizer_lib.for_run(tmp_path / "quant" / "int4-g32").vocab_size == VOCAB
  assert np.isfinite(np.asarray(qmodel(jnp.ones((1, 8), jnp.int32)))).all()
