"""gemkit as an lm-evaluation-harness model (``gemkit.lm_harness``) against lm-eval's
own ``hf`` backend (``HFLM``, transformers in float32) on one tiny random Llama
checkpoint with a real byte-level BPE tokenizer.json (``tests.hf_models``;
vocab 301, BOS 1, EOS 2, PAD 0; nothing is downloaded).

* loglikelihood (rtol 1e-4, is_greedy flags equal): an empty context,
  contexts with trailing spaces, multilingual text, code, a long context cut
  from the left by ``max_length``, continuations that are the greedy ones;
* loglikelihood_rolling: a document of several ``max_length`` windows;
* generate_until: greedy strings with ``until`` stops and ``max_gen_toks``,
  a context cut to ``max_length - max_gen_toks``; sampling is refused;
* encodings (``tok_encode``, ``_encode_pair``) with and without ``add_bos_token``;
* ``quantize=`` and ``adapter=`` (gemkit and PEFT adapters) score as the
  quantized / adapted gemkit model does (PEFT: as HFLM's ``peft=``);
* one end-to-end ``python -m launch.lm_eval`` run per backend on local
  YAML tasks (multiple choice and rolling perplexity): same accuracy, same
  bits_per_byte, same per-sample log-likelihoods;
* gemkit's held-out bits-per-byte (``gemkit.evaluate``'s disjoint windows)
  against lm-eval's rolling bits-per-byte on the same text and window: equal
  when the text's token count is a multiple of the window; otherwise they differ
  by exactly the last window's context (lm-eval gives the last, partial window a
  full window of context; gemkit's disjoint windows do not), which is computed
  and checked.

The ``slow`` tests run the model on a mesh of 2 devices in one process and
through lm-eval's evaluator on 2 processes (``jax.distributed``, gloo).
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402  pylint: disable=wrong-import-position
from lm_eval.models.huggingface import HFLM  # noqa: E402  pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
from gemkit import evaluate, hf, lm_harness  # noqa: E402
from gemkit.surgery import lora, quantize  # noqa: E402
from tests.hf_models import save_tiny_hf  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
MAX_LEN = 32            # small, so requests are cut and documents take several windows
BATCH = 4
RTOL = 1e-4
TIMEOUT = 240
LONG = "The quick brown fox jumps over the lazy dog. " * 8
DOC = ("The quick brown fox jumps over the lazy dog. Über Größe: straße, Äpfel. "
       "机器学习很有趣。 مرحبا بالعالم emoji 🚀✨ and\ttabs\nnew lines\n"
       "def f(x):\n    return x * 2  # code\n") * 2
LL_REQUESTS = [
    ("The quick brown", " fox jumps"),
    ("", "The quick brown fox."),                  # empty context: the prefix token
    ("The quick brown ", "fox jumps"),             # trailing space moves to the continuation
    ("Über Größe:  ", "straße, Äpfel."),           # two trailing spaces
    ("机器学习", "很有趣。"),
    ("مرحبا", " بالعالم"),
    ("def f(x):\n    return", " x * 2  # code"),
    (LONG, "The quick brown fox"),                 # longer than max_length: cut from the left
]
GREEDY_CONTEXTS = ["The quick brown", "机器学习", "new lines", "Über Größe:", "emoji"]


def inst(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  save_tiny_hf("llama", d)
  return d


@pytest.fixture(scope="module")
def ref(hf_dir):
  return HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=BATCH, max_length=MAX_LEN,
              device="cpu")


@pytest.fixture(scope="module")
def ours(hf_dir):
  return lm_harness.GemkitLM(str(hf_dir), dtype="float32", batch_size=BATCH,
                             max_length=MAX_LEN)


def test_registered():
  from lm_eval.api.registry import get_model
  assert get_model("gemkit") is lm_harness.GemkitLM
  assert get_model("hf").__name__ == "HFLM"        # the built-in models are still there


def test_encoding_matches_hflm(hf_dir, ref, ours):
  texts = ["Hello world", "The quick brown ", "机器学习很有趣。", "<s>starts with BOS", ""]
  for t in texts:
    for special in (None, False, True):
      assert ours.tok_encode(t, add_special_tokens=special) == ref.tok_encode(
          t, add_special_tokens=special), (t, special)
  for ctx, cont in LL_REQUESTS:
    if ctx:
      assert ours._encode_pair(ctx, cont) == ref._encode_pair(ctx, cont)
  assert ours.prefix_token_id == ref.prefix_token_id == 1
  assert ours.eot_token_id == ref.eot_token_id == 2
  assert ours.max_length == ref.max_length == MAX_LEN
  # add_bos_token=True: transformers then puts BOS first, and so does gemkit.
  ref_bos = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=1, device="cpu",
                 add_bos_token=True)
  ours_bos = lm_harness.GemkitLM(str(hf_dir), dtype="float32", add_bos_token=True)
  for t in texts:
    for special in (None, False):
      assert ours_bos.tok_encode(t, add_special_tokens=special) == ref_bos.tok_encode(
          t, add_special_tokens=special), (t, special)
  assert ours_bos.tok_encode("Hello")[0] == 1 and ours.tok_encode("Hello")[0] != 1
  assert ours_bos.max_length == ref_bos.max_length == 256     # config.json's positions


def test_loglikelihood_matches_hf(ref, ours):
  greedy = ref.generate_until([inst("generate_until", c, {"max_gen_toks": 2, "until": []})
                               for c in GREEDY_CONTEXTS])
  pairs = LL_REQUESTS + list(zip(GREEDY_CONTEXTS, greedy))
  reqs = [inst("loglikelihood", c, x) for c, x in pairs]
  want, got = ref.loglikelihood(reqs), ours.loglikelihood(reqs)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert any(w[1] for w in want) and not all(w[1] for w in want)
  assert len(ref.tok_encode(LONG)) > MAX_LEN + 1               # the long one was cut
  shapes = {s for k, s in ours.compiled if k == "score"}
  assert shapes <= {(BATCH, b) for b in lm_harness.buckets(MAX_LEN)}


def test_rolling_matches_hf(ref, ours):
  docs = [DOC, "emoji 🚀✨ and\ttabs", ""]
  assert len(ours.tok_encode(DOC)) > 3 * MAX_LEN               # several windows
  reqs = [inst("loglikelihood_rolling", d) for d in docs]
  want, got = ref.loglikelihood_rolling(reqs), ours.loglikelihood_rolling(reqs)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  assert got[2] == want[2] == 0.0


def test_generate_until_matches_hf(ref, ours):
  free = ref.generate_until([inst("generate_until", "The quick brown",
                                  {"max_gen_toks": 12, "until": []})])[0]
  stop = free[4:6]          # a stop string the continuation contains
  assert len(free) > 6 and stop
  reqs = [inst("generate_until", "The quick brown", {"max_gen_toks": 12, "until": []}),
          inst("generate_until", "The quick brown", {"max_gen_toks": 12, "until": [stop]}),
          inst("generate_until", "def f(x):", {"until": ["\n\n", "zzz"], "max_gen_toks": 20,
                                               "do_sample": False}),
          inst("generate_until", "机器学习", {"max_gen_toks": 5}),
          inst("generate_until", LONG, {"max_gen_toks": 7, "temperature": 0.0})]
  want, got = ref.generate_until(reqs), ours.generate_until(reqs)
  assert got == want
  assert got[0] == free and got[1] == free[:free.index(stop)]
  with pytest.raises(ValueError, match="greedily"):
    ours.generate_until([inst("generate_until", "x", {"do_sample": True, "temperature": 0.7})])


def test_bits_per_byte_protocols(ours):
  """gemkit.evaluate's heldout_bpb (document [BOS, t_1..t_n, EOS], disjoint windows of W
  inputs, EOS not counted) vs lm-eval's rolling bits-per-byte (-sum loglik / ln 2 /
  UTF-8 bytes; windows of W after the prefix token BOS) on the same text."""
  tok, W = ours.tokenizer, MAX_LEN

  def both(text):
    ids = tok.encode(text)
    metrics, _, per_doc = evaluate.heldout_perplexity(
        ours.model, [tok.encode(text, bos=True, eos=True)], window=W, tokenizer=tok)
    nbytes = len(text.encode("utf-8"))
    assert per_doc["bytes"][0] == nbytes == tok.token_bytes()[ids].sum()
    loglik = ours.loglikelihood_rolling([inst("loglikelihood_rolling", text)])[0]
    return ids, metrics["bits_per_byte"], -loglik / math.log(2) / nbytes, per_doc, nbytes

  # A text of a multiple of W tokens (at least 2 W): the same windows, the same predictions.
  text = next(DOC[:k] for k in range(len(DOC), 0, -1)
              if len(tok.encode(DOC[:k])) % W == 0 and len(tok.encode(DOC[:k])) >= 2 * W)
  _, gemkit_bpb, lm_eval_bpb, _, _ = both(text)
  np.testing.assert_allclose(gemkit_bpb, lm_eval_bpb, rtol=1e-5)

  # n = qW + r tokens, 0 < r: lm-eval scores the last r tokens with the W inputs that end
  # at t_{n-1}; gemkit with the inputs from its last window's start, t_{qW} (x_qW).
  ids, gemkit_bpb, lm_eval_bpb, per_doc, nbytes = both(DOC)
  n = len(ids)
  q, r = divmod(n, W)
  assert q >= 3 and r > 1
  x = np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32)
  short = evaluate.score(ours.model, [(x[q * W:n], x[q * W + 1:n + 1])])[0][0][-r:]
  full = evaluate.score(ours.model, [(x[n - W:n], x[n - W + 1:n + 1])])[0][0][-r:]
  gemkit_nll = gemkit_bpb * math.log(2) * nbytes
  lm_eval_nll = lm_eval_bpb * math.log(2) * nbytes
  np.testing.assert_allclose(gemkit_nll - lm_eval_nll, full.sum() - short.sum(), atol=1e-3)
  assert abs(gemkit_bpb - lm_eval_bpb) > 1e-4         # the difference is real here
  np.testing.assert_allclose(per_doc["byte_nll"][0], gemkit_nll, rtol=1e-9)


def _rows(ours):
  reqs = [((c, x),) + ours._encode_pair(c, x) for c, x in LL_REQUESTS[:1] + LL_REQUESTS[4:6]]
  return reqs, [(list(a + b)[:-1], list(a + b)[1:]) for _, a, b in reqs]


def test_quantize(hf_dir, ours):
  q = lm_harness.GemkitLM(str(hf_dir), dtype="float32", batch_size=BATCH, max_length=MAX_LEN,
                          quantize="int4-g32")
  reqs, rows = _rows(ours)
  model, _, _ = hf.load(hf_dir, dtype="float32")
  qmodel, report = quantize.quantize_model(model, quantize.default_rules("int4-g32"))
  assert len(report) == 14                     # 7 Dense layers x 2 blocks; the head stays float
  want = [lp for lp, _ in evaluate.score(qmodel, rows)]
  got = [lp for lp, _ in q.score_rows(rows)]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  floats = [s for s, _ in ours._loglikelihood_tokens(reqs)]
  quants = [s for s, _ in q._loglikelihood_tokens(reqs)]
  assert floats != quants
  np.testing.assert_allclose(quants, floats, rtol=0.1)
  assert q.get_model_info()["gemkit_quantize"] == "int4-g32"


def test_gemkit_adapter(hf_dir, ours, tmp_path):
  model, _, _ = hf.load(hf_dir, dtype="float32")
  lora.apply_lora(model, lora.LoRARule("all-linear", rank=4, alpha=8.0))
  rng = np.random.default_rng(0)
  for _, wrapper in lora.wrappers(model):
    b = wrapper.adapters["default"].b
    b[...] = rng.normal(0, 0.05, b.shape).astype(np.float32)
  lora.save_adapter(model, tmp_path / "adapter")
  adapted = lm_harness.GemkitLM(str(hf_dir), dtype="float32", batch_size=BATCH,
                                max_length=MAX_LEN, adapter=str(tmp_path / "adapter"))
  reqs, rows = _rows(ours)
  for (g, _), (w, _) in zip(adapted.score_rows(rows), evaluate.score(model, rows)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  assert ([s for s, _ in adapted._loglikelihood_tokens(reqs)]
          != [s for s, _ in ours._loglikelihood_tokens(reqs)])


def test_peft_adapter_matches_hflm_peft(hf_dir, ours, tmp_path):
  if not hasattr(hf, "load_adapter"):
    pytest.skip("gemkit.hf.load_adapter (PEFT adapters) is not in this gemkit")
  peft = pytest.importorskip("peft")
  import transformers  # pylint: disable=g-import-not-at-top
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
  torch.manual_seed(0)
  peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "peft")
  ref = HFLM(pretrained=str(hf_dir), peft=str(tmp_path / "peft"), dtype="float32",
             batch_size=BATCH, max_length=MAX_LEN, device="cpu")
  adapted = lm_harness.GemkitLM(str(hf_dir), dtype="float32", batch_size=BATCH,
                                max_length=MAX_LEN, adapter=str(tmp_path / "peft"))
  reqs = [inst("loglikelihood", c, x) for c, x in LL_REQUESTS]
  want, got = ref.loglikelihood(reqs), adapted.loglikelihood(reqs)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL)
  assert [g[0] for g in got] != [s for s, _ in ours.loglikelihood(reqs)]


def test_gemkit_run_with_byte_tokenizer_matches_hf_export(tmp_path):
  """A gemkit-trained run (byte tokenizer, loaded from its checkpoint directory) against
  HFLM on its export (Gemma architecture, the byte tokenizer's tokenizer.json, which
  puts BOS first as gemkit does)."""
  from gemkit import runs, train  # pylint: disable=g-import-not-at-top
  from gemkit.config import ConfigError  # pylint: disable=g-import-not-at-top
  from gemkit.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  trainer = train.Trainer(tiny_config(tmp_path, **{"train.steps": 2,
                                                   "train.checkpoint_every": 2}), workdir)
  trainer.run(2)
  trainer.close()
  model, config = runs.load(workdir)
  export = hf.save(model, config, tmp_path / "export", tokenizer=ByteTokenizer())
  step_dir = str(workdir / "checkpoints" / "2")
  ours = lm_harness.GemkitLM(step_dir, batch_size=BATCH)
  ref = HFLM(pretrained=str(export), dtype="float32", batch_size=BATCH, max_length=MAX_LEN,
             device="cpu")
  assert ours.max_length == MAX_LEN == config.data.seq_len
  assert ours.prefix_token_id == ref.prefix_token_id == 257
  assert ours.tok_encode("def f(x):") == ref.tok_encode("def f(x):") == [257, *b"def f(x):"]
  reqs = [inst("loglikelihood", c, x) for c, x in LL_REQUESTS[:4]]
  np.testing.assert_allclose([v for v, _ in ours.loglikelihood(reqs)],
                             [v for v, _ in ref.loglikelihood(reqs)], rtol=RTOL)
  rolling = [inst("loglikelihood_rolling", "def f(x):\n    return x * 2\n" * 4)]
  np.testing.assert_allclose(ours.loglikelihood_rolling(rolling),
                             ref.loglikelihood_rolling(rolling), rtol=RTOL)
  with pytest.raises(ConfigError, match="dtype"):
    lm_harness.GemkitLM(str(workdir), dtype="bfloat16")


# --- lm-eval's command line ----------------------------------------------------------------

MC = [
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog.", " moon.",
                                                                   " 机器学习"], "gold": 0},
    {"question": "Über Größe:", "choices": [" straße, Äpfel.", " the dog", " return x"],
     "gold": 0},
    {"question": "def f(x):\n    return", "choices": [" x * 2", " fox", " 很有趣"], "gold": 0},
    {"question": "emoji", "choices": [" 🚀✨", " and tabs", " dog"], "gold": 1},
    {"question": "مرحبا", "choices": [" بالعالم", " world", " Größe"], "gold": 0},
    {"question": "机器学习", "choices": ["很有趣。", " brown", " lazy"], "gold": 2},
]


def write_tasks(directory: pathlib.Path) -> pathlib.Path:
  """Two lm-eval YAML tasks over local JSONL files: multiple choice and rolling perplexity."""
  directory.mkdir(parents=True, exist_ok=True)
  lines = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  (directory / "mc.jsonl").write_text(lines(MC), encoding="utf-8")
  (directory / "docs.jsonl").write_text(lines([{"text": DOC}, {"text": LONG}]),
                                        encoding="utf-8")
  common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            "test_split: test\n")
  (directory / "mc.yaml").write_text(
      "task: gemkit_test_mc\n" + common.format(path=directory / "mc.jsonl") +
      "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
      "doc_to_target: \"{{gold}}\"\ndoc_to_choice: \"{{choices}}\"\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
  (directory / "ppl.yaml").write_text(
      "task: gemkit_test_ppl\n" + common.format(path=directory / "docs.jsonl") +
      "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
      "metric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n",
      encoding="utf-8")
  return directory


def _env(hf_home: pathlib.Path, devices: int = 1) -> dict:
  return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(hf_home),
              JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def start_cli(model: str, model_args: str, tasks_dir: pathlib.Path, out: pathlib.Path,
              *extra: str) -> subprocess.Popen:
  """``python -m launch.lm_eval`` on the two tasks, in a subprocess."""
  cmd = [sys.executable, "-m", "launch.lm_eval", "--model", model, "--model_args", model_args,
         "--tasks", "gemkit_test_mc,gemkit_test_ppl", "--include_path", str(tasks_dir),
         "--output_path", str(out), "--log_samples", "--batch_size", str(BATCH), *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=_env(out.parent / f"hf_home_{out.name}"),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def cli_results(proc: subprocess.Popen, out: pathlib.Path):
  """(results json, {task: per document [log-likelihoods]}, stderr) of a finished run."""
  try:
    _, stderr = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-4000:]
  results = json.loads(next(out.rglob("results_*.json")).read_text())
  samples = {}     # task -> per document, the log-likelihood of each request
  for f in out.rglob("samples_*.jsonl"):
    rows = sorted((json.loads(l) for l in f.read_text().splitlines() if l.strip()),
                  key=lambda r: r["doc_id"])
    samples[f.name[len("samples_"):].rsplit("_", 1)[0]] = [
        [float(x[0] if isinstance(x, list) else x) for x in r["filtered_resps"]] for r in rows]
  return results, samples, stderr


def test_cli_end_to_end_matches_hf(hf_dir, tmp_path):
  tasks = write_tasks(tmp_path / "tasks")
  runs = [start_cli("gemkit", f"pretrained={hf_dir},max_length={MAX_LEN}", tasks,
                    tmp_path / "gemkit"),
          start_cli("hf", f"pretrained={hf_dir},max_length={MAX_LEN},dtype=float32", tasks,
                    tmp_path / "hf", "--device", "cpu")]
  try:
    (ours, our_samples, log), (want, want_samples, _) = [
        cli_results(p, tmp_path / name) for p, name in zip(runs, ("gemkit", "hf"))]
  finally:
    for p in runs:
      if p.poll() is None:
        p.kill()
  assert "batch shapes so far, each compiled once" in log
  mc, ppl = "gemkit_test_mc", "gemkit_test_ppl"
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"][mc][metric] == want["results"][mc][metric]
  assert 0 < ours["results"][mc]["acc_norm,none"] < 1
  np.testing.assert_allclose(ours["results"][ppl]["bits_per_byte,none"],
                             want["results"][ppl]["bits_per_byte,none"], rtol=RTOL)
  assert sorted(our_samples) == sorted(want_samples) == [mc, ppl]
  for task in (mc, ppl):
    assert len(our_samples[task]) == len(want_samples[task]) == (6 if task == mc else 2)
    np.testing.assert_allclose(our_samples[task], want_samples[task], rtol=RTOL)
  assert ours["config"]["model"] == "gemkit"


# --- meshes and processes (slow) -------------------------------------------------------------

SCRIPT = r"""
import json, sys
pid, port, hf_dir, tasks = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
from gemkit import sharding
if pid >= 0:
  sharding.initialize_distributed(f"localhost:{port}", 2, pid)
import jax, lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
import gemkit.lm_harness as H
lm = H.GemkitLM(hf_dir, dtype="float32", batch_size=3, max_length=32)
inst = lambda kind, *a: Instance(request_type=kind, doc={}, arguments=a, idx=0)
reqs = json.loads(sys.argv[5])
mine = reqs if pid < 0 else reqs[pid::2] + (reqs[:5] if pid == 1 else [])   # ranks differ
ll = lm.loglikelihood([inst("loglikelihood", *r) for r in mine])
gen = lm.generate_until([inst("generate_until", r[0], {"max_gen_toks": 6, "until": []})
                         for r in mine])
res = lm_eval.simple_evaluate(model=lm, tasks=["gemkit_test_mc", "gemkit_test_ppl"],
                              task_manager=TaskManager(include_path=tasks))
out = {"rank": lm.rank, "world": lm.world_size, "mesh": dict(lm.mesh.shape), "ll": ll,
       "gen": gen, "results": None if res is None else {
           k: {m: v for m, v in r.items() if isinstance(v, float)}
           for k, r in res["results"].items()}}
print(json.dumps(out))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _reference(ours, tmp_path):
  tasks = write_tasks(tmp_path / "tasks")
  reqs = [list(r) for r in LL_REQUESTS]
  ll = ours.loglikelihood([inst("loglikelihood", *r) for r in reqs])
  gen = ours.generate_until([inst("generate_until", r[0], {"max_gen_toks": 6, "until": []})
                             for r in reqs])
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  res = lm_eval.simple_evaluate(model=ours, tasks=["gemkit_test_mc", "gemkit_test_ppl"],
                                task_manager=TaskManager(include_path=str(tasks)))
  return tasks, reqs, ll, gen, res["results"]


def _run(args, devices, tmp_path):
  return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO,
                          env=_env(tmp_path / "hf_home", devices), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _json(proc):
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, err[-4000:]
  return json.loads(out.strip().splitlines()[-1])


def _check_results(got, want):
  for task in ("gemkit_test_mc", "gemkit_test_ppl"):
    for metric in ("acc,none", "acc_norm,none", "bits_per_byte,none"):
      if metric in want[task]:
        np.testing.assert_allclose(got[task][metric], want[task][metric], rtol=RTOL)


@pytest.mark.slow
def test_two_devices_one_process(hf_dir, ours, tmp_path):
  tasks, reqs, ll, gen, results = _reference(ours, tmp_path)
  r = _json(_run(["-1", "0", str(hf_dir), str(tasks), json.dumps(reqs)], 2, tmp_path))
  assert r["mesh"]["fsdp"] == 2 and r["world"] == 1
  np.testing.assert_allclose([x[0] for x in r["ll"]], [x[0] for x in ll], rtol=RTOL)
  assert [x[1] for x in r["ll"]] == [x[1] for x in ll]
  assert r["gen"] == gen
  _check_results(r["results"], results)


@pytest.mark.slow
def test_two_processes(hf_dir, ours, tmp_path):
  """Ranks with different numbers and lengths of requests (dummy batches pad the
  shorter rank), and lm-eval's evaluator splitting documents over the ranks and
  gathering on rank 0."""
  tasks, reqs, ll, gen, results = _reference(ours, tmp_path)
  port = str(_free_port())
  procs = [_run([str(pid), port, str(hf_dir), str(tasks), json.dumps(reqs)], 1, tmp_path)
           for pid in (0, 1)]
  try:
    outs = [_json(p) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, r in enumerate(outs):
    assert r["rank"] == pid and r["world"] == 2 and r["mesh"]["data"] == 2
    idx = list(range(len(reqs)))[pid::2] + (list(range(5)) if pid == 1 else [])
    np.testing.assert_allclose([x[0] for x in r["ll"]], [ll[i][0] for i in idx], rtol=RTOL)
    assert r["gen"] == [gen[i] for i in idx]
  assert outs[1]["results"] is None
  _check_results(outs[0]["results"], results)
