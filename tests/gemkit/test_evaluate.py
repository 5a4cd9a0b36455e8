"""Evaluation: perplexity and loglikelihood by hand, batch invariance, task files, the launcher."""

import functools
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import models
from gemkit import data, evaluate, runs, sample, synthetic, tasks
from gemkit import config as config_lib
from gemkit import train as train_lib
from gemkit.config import ConfigError
from tests.helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TOK = data.ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  return models.build(tiny_config().model, rngs=nnx.Rngs(0))


@functools.lru_cache
def _forward(graphdef):
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def _logprobs(model, tokens, length=128):
  """float64 log-softmax of a plain forward pass (no segment ids): [len(tokens), V].

  The tokens are followed by zeros up to ``length`` (one compilation); the
  model is causal, so position i never sees the tail.
  """
  padded = np.zeros((1, length), np.int32)
  padded[0, :len(tokens)] = tokens
  graphdef, state = nnx.split(model)
  logits = np.asarray(_forward(graphdef)(state, padded)[0, :len(tokens)], np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _docs():
  texts = ["def f(x):\n    return x\n", "import os  # \u00e9\n", "pass"]
  return [TOK.encode(t, bos=True, eos=True) for t in texts]


@pytest.mark.parametrize("stride", [None, 3])
def test_perplexity_is_exp_of_mean_nll_by_hand(model, stride):
  W = 8
  S = stride or W
  nll, n, byte_nll, n_bytes = 0.0, 0, 0.0, 0
  for x in _docs():
    windows = {}
    for t in range(1, len(x)):          # target x[t] is predicted by the first window covering it
      start = max(0, -(-(t - W) // S)) * S
      if start not in windows:
        windows[start] = _logprobs(model, x[start:start + W])
      lp = windows[start][t - 1 - start, x[t]]
      nll, n = nll - lp, n + 1
      if x[t] < 256:
        byte_nll, n_bytes = byte_nll - lp, n_bytes + 1
  metrics, stderr, per_doc = evaluate.heldout_perplexity(model, _docs(), window=W,
                                                         stride=stride, batch_size=3)
  np.testing.assert_allclose(metrics["nll"], nll / n, rtol=1e-5)
  np.testing.assert_allclose(metrics["perplexity"], math.exp(nll / n), rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_byte"], byte_nll / n_bytes / math.log(2),
                             rtol=1e-5)
  assert metrics["tokens"] == n and metrics["bytes"] == n_bytes and stderr["nll"] > 0
  assert sum(per_doc["bytes"]) == n_bytes and sum(per_doc["nll"]) == pytest.approx(nll)
  again, _, _ = evaluate.heldout_perplexity(model, _docs(), window=W, stride=stride,
                                            batch_size=1)
  assert again == pytest.approx(metrics, rel=1e-6)


def test_loglikelihood_is_sum_of_token_logprobs_and_batch_invariant(model):
  pairs = [("def ", "f(x):"), ("import os", "\n"), ("x = [1, 2, 3]\nprint(", "len(x))"),
           ("a", "bcdefghijklmnopqrstuvwxyz" * 3)]
  reqs = [(TOK.encode(c, bos=True), TOK.encode(x)) for c, x in pairs]
  out = {b: evaluate.loglikelihood(model, reqs, batch_size=b) for b in (1, 3)}
  for (ctx, cont), (lp, greedy) in zip(reqs, out[3]):
    seq = np.concatenate([ctx, cont])
    logp = _logprobs(model, seq[:-1])
    pos = np.arange(len(ctx) - 1, len(seq) - 1)
    np.testing.assert_allclose(lp, logp[pos, seq[pos + 1]].sum(), rtol=1e-5)
    assert greedy == bool((logp[pos].argmax(-1) == seq[pos + 1]).all())
  np.testing.assert_allclose([o[0] for o in out[1]], [o[0] for o in out[3]], rtol=1e-6)
  assert [o[1] for o in out[1]] == [o[1] for o in out[3]]
  # A continuation made of argmax tokens is is_greedy.
  seq = TOK.encode("def ", bos=True)
  for _ in range(3):
    seq = np.append(seq, _logprobs(model, seq)[-1].argmax())
  assert evaluate.loglikelihood(model, [(seq[:5], seq[5:])], batch_size=3)[0][1]
  # Left truncation to max_length keeps the continuation (5 tokens) and 1 token of context.
  cut = evaluate.loglikelihood(model, reqs[:1], max_length=6, batch_size=3)[0][0]
  seq = np.concatenate(reqs[0])[-7:]
  logp = _logprobs(model, seq[:-1])
  np.testing.assert_allclose(cut, logp[np.arange(1, 6), seq[2:]].sum(), rtol=1e-5)


def test_synthetic_scores_are_batch_invariant(model):
  for task in (synthetic.MQAR(num_pairs=4, seq_len=60), synthetic.Counting(length=7, running=True)):
    a = evaluate.evaluate_synthetic(model, task, num_examples=5, batch_size=1)
    b = evaluate.evaluate_synthetic(model, task, num_examples=5, batch_size=4)
    assert a == b
  # Teacher-forced correctness equals greedy decoding of the prompt.
  exs = synthetic.examples(synthetic.Arithmetic(digits=1), 0, 6)
  scored = evaluate.score(model, [(e.inputs, e.targets) for e in exs], batch_size=4)
  for e, (_, ok) in zip(exs, scored):
    gen = sample.generate_ids(model, [e.prompt], max_new_tokens=len(e.answer))[0]
    assert ok[e.loss_mask > 0].all() == np.array_equal(gen, e.answer)


def test_acc_norm_divides_by_byte_length():
  acc, acc_norm = tasks.choice_metrics([[-4.0, -6.0, -9.0]], [[2, 6, 3]], [1])
  assert acc[0] == 0 and acc_norm[0] == 1        # -4/2 = -2 < -6/6 = -1
  task = tasks.TaskFile("t", "t.jsonl", "multiple_choice", (
      {"type": "multiple_choice", "context": "x", "choices": ["ab", "é"], "gold": 1},))
  fake = {"ab": -3.0, "é": -3.5}                  # "é" is 2 UTF-8 bytes: -1.75 < -1.5
  values, _ = tasks.evaluate(task, lambda pairs: [(fake[c], False) for _, c in pairs], None)
  assert values["acc"][0] == 0 and values["acc_norm"][0] == 0
  fake["é"] = -2.9
  values, _ = tasks.evaluate(task, lambda pairs: [(fake[c], False) for _, c in pairs], None)
  assert values["acc"][0] == 1 and values["acc_norm"][0] == 1


def test_bootstrap_stderr_matches_binomial():
  x = (np.random.default_rng(0).random(400) < 0.3).astype(float)
  se = evaluate.bootstrap_stderr(lambda v: v.mean(-1), x, resamples=2000)
  np.testing.assert_allclose(se, math.sqrt(x.mean() * (1 - x.mean()) / 400), rtol=0.1)
  assert evaluate.bootstrap_stderr(lambda v: v.mean(-1), x[:1]) is None


@pytest.mark.parametrize("lines,message", [
    (['{"type": "loglikelihood", "context": "a"}'], ":1: missing field 'continuation'"),
    (['{"type": "loglikelihood", "context": "a", "continuation": "b"}',
      '{"type": "multiple_choice", "context": "a", "choices": [], "gold": 0}'],
     ":2: field 'choices' is empty"),
    (['', '{"type": "generate_until", "context": "a", "target": "b"', ''],
     ":2: invalid JSON"),
    (['{"type": "multiple_choice", "context": "a", "choices": ["x"], "gold": 1}'],
     ":1: field 'gold' = 1 is not an index"),
    (['{"type": "generate_until", "context": "a", "target": "b", "stop": ["\\n"]}'],
     ":1: unknown field 'stop'"),
    (['{"type": "loglikelihood", "context": "a", "continuation": "b"}',
      '{"type": "generate_until", "context": "a", "target": "b"}'],
     ":2: type 'generate_until' differs from the file's type 'loglikelihood' (line 1)"),
    (['[1, 2]'], ":1: expected a JSON object"),
])
def test_malformed_task_file_names_file_and_line(tmp_path, lines, message):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(tasks.TaskFileError) as e:
    tasks.load(path)
  assert f"{path}{message}" in str(e.value)


def test_example_task_files_load():
  for name in ("stdlib_mc", "stdlib_complete", "stdlib_idioms"):
    task = tasks.load(evaluate.task_file_path(name))
    assert len(task.records) >= 10


def test_task_files_end_to_end_batch_invariant(model, tmp_path):
  path = tmp_path / "gen.jsonl"
  rows = [{"type": "generate_until", "context": c, "target": "x", "until": ["\n"],
           "max_new_tokens": m} for c, m in [("def f", 4), ("import", 3), ("x = 1", 4)]]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = evaluate.default_config()
  out = [evaluate.evaluate(model, [str(path), "stdlib_mc"], eval_config=cfg, batch_size=b,
                           max_examples=4, show_progress=False)["rows"] for b in (1, 3)]
  assert out[0][0]["examples"] == out[1][0]["examples"]
  for r, (row, m) in zip(out[0][0]["examples"], [(r, r["max_new_tokens"]) for r in rows]):
    ids = sample.generate_ids(model, [TOK.encode(row["context"], bos=True)], max_new_tokens=m)[0]
    assert r["generation"] == tasks.cut_at_stop(TOK.decode(ids), ["\n"])
  np.testing.assert_allclose(
      np.array([e["logprobs"] for e in out[0][1]["examples"]]),
      np.array([e["logprobs"] for e in out[1][1]["examples"]]), rtol=1e-6)
  assert out[0][1]["metrics"] == pytest.approx(out[1][1]["metrics"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A step-0 checkpoint of the tiny config (no training needed) and a metrics log."""
  tmp = tmp_path_factory.mktemp("run")
  trainer = train_lib.Trainer(tiny_config(tmp), tmp / "run")
  trainer.save(force=True)
  for step, loss in [(1, 6.0), (2, 5.5)]:
    trainer.writer.write(step, "train", {"loss": loss})
  trainer.writer.write(2, "eval", {"loss": 5.7})
  trainer.close()
  return tmp / "run"


def test_checkpoint_paths_resolve():
  assert runs.resolve_checkpoint("r/x") == (pathlib.Path("r/x"), None)
  assert runs.resolve_checkpoint("r/x/checkpoints") == (pathlib.Path("r/x"), None)
  assert runs.resolve_checkpoint("r/x/checkpoints/40") == (pathlib.Path("r/x"), 40)


def test_launcher_writes_report_table_and_plots(run_dir, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--checkpoint={run_dir}/checkpoints/0",
       "--tasks=heldout_bpb,heldout_bpb_sliding,parity,stdlib_idioms", "--max_examples=3",
       "--batch_size=4", "--config.parity.lengths=(4,9)", "--config.heldout.stride=8",
       f"--output={tmp_path}/r.json", f"--plots_dir={tmp_path}/plots",
       f"--compare=float={run_dir}/checkpoints", f"--compare=same={run_dir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "r.json").read_text())
  s = report["settings"]
  assert s["step"] == 0 and s["corpus_fingerprint"] == s["checkpoint_corpus_fingerprint"]
  assert s["git_commit"] and s["eval_config"]["parity"]["lengths"] == [4, 9]
  assert s["tokenizer"].startswith("bytes: vocab 259")     # a run that records no tokenizer
  assert [r["task"] for r in report["results"]] == [
      "heldout_bpb", "heldout_bpb_sliding", "parity", "parity", "stdlib_idioms"]
  disjoint, sliding = report["results"][:2]
  assert sliding["setting"] == {"window": 32, "stride": 8} and "stride 8" in sliding["protocol"]
  assert 1 <= disjoint["n"] <= 3 and disjoint["metrics"]["bits_per_byte"] > 0   # documents
  first, same = report["bpb_variants"]
  assert first["bits_per_byte"] == pytest.approx(disjoint["metrics"]["bits_per_byte"])
  assert first["delta"] is None and same["delta"] == 0.0
  assert same["delta_stderr"] == (0.0 if disjoint["n"] > 1 else None)   # None: 1 document
  assert "| parity | length=9, modulus=2 | 3 |" in out.stdout
  for name in ("parity", "loss_curves", "bpb_variants"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["--tasks=nope"], "config error: tasks: unknown task 'nope'"),
    (["--config.passkey.depthz=1"], "config error: passkey.depthz: unknown config key"),
])
def test_launcher_errors_are_one_line(run_dir, args, message):
  out = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={run_dir}", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize("key,value,message", [
    ("heldout.stride", 0, "heldout.stride: must be in"),
    ("passkey.context_lens", (64,), "passkey.context_lens: context_len=64 is too short"),
    ("mqar.seq_lens", (8,), "mqar.seq_lens: no setting fits"),
    ("passkey.depths", (1.5,), "passkey.depths: must lie in [0, 1]"),
])
def test_bad_eval_config_names_the_key(model, key, value, message):
  cfg = evaluate.default_config()
  config_lib.override(cfg, key, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    evaluate.evaluate(model, [key.split(".")[0] if key != "heldout.stride" else "heldout_bpb"],
                      eval_config=cfg)
