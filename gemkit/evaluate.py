"""Evaluation: held-out perplexity and bits-per-byte, JSONL tasks, synthetic suites.

Everything reduces to one batched primitive, :func:`score`: for rows of
(inputs, targets) it runs the model's forward pass ``model(tokens,
segment_ids)`` (so it works for every family ``models.build`` makes) and
returns, per position, ``log p(target)`` and whether the target is the argmax.
Rows are sorted by length, right-padded to a multiple of ``bucket`` and to a
full batch (padding has segment id 0 and is sliced off), so results do not
depend on the batch size: causal models never let a position see the padding
to its right.

* Held-out perplexity (:func:`heldout_perplexity`), per document
  ``x_0 = BOS, x_1 .. x_N`` (the last one EOS), every target predicted once:

    - ``disjoint`` windows of ``W`` tokens (lm-eval-harness's rolling
      loglikelihood): window k reads x[kW : kW+W] and predicts
      x[kW+1 : kW+W+1], so its first prediction sees one token of context.
    - ``sliding`` windows of ``W`` with stride ``S``: window k reads
      x[kS : kS+W] and predicts only the targets no earlier window predicted
      (the last S), each with at least W - S tokens of context.

  Token level: ``nll`` = sum NLL / N (nats per token, EOS included) and
  ``perplexity = exp(nll)``. Byte level: ``bits_per_byte`` = sum over the
  targets that stand for text (``token_bytes[target] > 0``: special tokens
  such as EOS excluded, as in ``gemkit.train``) of NLL / ln 2, over the sum
  of their ``token_bytes`` (UTF-8 bytes; for the byte tokenizer, one per
  byte target), and ``byte_perplexity = 2 ** bits_per_byte``.

Every text is encoded with the run's tokenizer (``gemkit.tokenizer``; the
byte tokenizer by default): held-out documents, task files (context and
continuation encoded separately, the context with a leading BOS where the
tokenizer has one) and the synthetic suites.
* JSONL tasks (``gemkit.tasks``): loglikelihood, multiple choice, greedy
  ``generate_until`` through ``gemkit.sample`` (the model's KV cache).
* Synthetic suites (``gemkit.synthetic``), scored teacher-forced in one
  forward pass: an example is correct when every answer token is the argmax
  given the true prefix, which is exactly when greedy decoding of the prompt
  reproduces the answer. ``acc`` is per example, ``token_acc`` per answer
  token (per query for MQAR: Zoology's metric).

Standard errors are bootstrap standard deviations of each metric over
examples (documents for perplexity). :func:`run` is what ``launch.evaluate``
calls; it returns a report with every number and the settings that produced it.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gemkit import config as config_lib
from gemkit import data as data_lib
from gemkit import metrics
from gemkit.metrics import LN2
from gemkit import runs
from gemkit import sample as sample_lib
from gemkit import synthetic
from gemkit import tasks as tasks_lib
from gemkit.config import REPO_ROOT, ConfigError
from gemkit.tokenizer import PAD, Tokenizer, resolve

HELDOUT_TASKS = {"heldout_bpb": "disjoint", "heldout_bpb_sliding": "sliding"}
SYNTHETIC_TASKS = ("mqar", "passkey", "parity", "modcount", "arithmetic")
DEFAULT_EVAL_CONFIG = "experiments/eval_default.py"


# --- progress ------------------------------------------------------------------


class Progress:
  """A progress bar on stderr (rewritten in place on a terminal, one line at the end otherwise)."""

  def __init__(self, total: int, desc: str, enabled: bool = True):
    self.total, self.desc, self.done = total, desc, 0
    self.enabled = enabled
    self.live = enabled and sys.stderr.isatty()
    self.start = time.perf_counter()

  def update(self, n: int = 1) -> None:
    self.done += n
    if self.live:
      frac = self.done / max(self.total, 1)
      bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
      sys.stderr.write(f"\r\033[K{self.desc} [{bar}] {self.done}/{self.total} "
                       f"{time.perf_counter() - self.start:.0f}s")
      sys.stderr.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stderr.write(("\r\033[K" if self.live else "") + f"{self.desc}: {self.done}/"
                       f"{self.total} in {time.perf_counter() - self.start:.1f}s\n")
      sys.stderr.flush()


# --- the scoring primitive -------------------------------------------------------


def score_rows(graphdef, state, inputs, targets, segment_ids):
  """(log p(target) [B, T] float32, target is the argmax [B, T]) of the forward pass
  (also lm-eval's scoring, ``gemkit.lm_harness``)."""
  model = nnx.merge(graphdef, state)
  logits = model(inputs, segment_ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return target_logp, jnp.argmax(logits, axis=-1) == targets


_score_batch = jax.jit(score_rows, static_argnames=("graphdef",))


def score(model: nnx.Module, rows: Sequence[tuple[np.ndarray, np.ndarray]], *,
          batch_size: int = 8, bucket: int = 64, progress: Progress | None = None,
          pad_id: int = PAD) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-position (log p(target) [T] float64, target is argmax [T] bool) for each row.

  Args:
    model: any model with ``model(tokens [B, T], segment_ids [B, T]) -> logits``.
    rows: (inputs [T_i], targets [T_i]) integer arrays; lengths may differ.
    batch_size: rows per forward pass (the batch is padded to this size).
    bucket: padded lengths are multiples of this (fewer compilations).
    pad_id: the id padding holds (the tokenizer's PAD).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  graphdef, state = nnx.split(model)
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  out: list[Any] = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    L = -(-max(len(rows[i][0]) for i in idx) // bucket) * bucket
    inputs = np.full((batch_size, L), pad_id, np.int32)
    targets = np.full((batch_size, L), pad_id, np.int32)
    seg = np.zeros((batch_size, L), np.int32)
    for j, i in enumerate(idx):
      n = len(rows[i][0])
      inputs[j, :n], targets[j, :n], seg[j, :n] = rows[i][0], rows[i][1], 1
    lp, greedy = jax.device_get(_score_batch(graphdef, state, inputs, targets, seg))
    for j, i in enumerate(idx):
      n = len(rows[i][0])
      out[i] = (lp[j, :n].astype(np.float64), greedy[j, :n])
    if progress:
      progress.update(len(idx))
  return out


def loglikelihood(model: nnx.Module, requests: Sequence[tuple[np.ndarray, np.ndarray]], *,
                  batch_size: int = 8, max_length: int = 0, progress: Progress | None = None,
                  pad_id: int = PAD) -> list[tuple[float, bool]]:
  """(sum_t log p(cont_t | ctx, cont_<t), all continuation tokens greedy) per request.

  ``requests`` are (context ids, continuation ids); with ``max_length > 0``
  the context is cut from the left so that the inputs fit in it.
  """
  rows, spans = [], []
  for ctx, cont in requests:
    if len(cont) == 0 or len(ctx) == 0:
      raise ValueError("context and continuation must each have at least one token")
    seq = np.concatenate([ctx, cont]).astype(np.int32)
    if max_length and len(seq) - 1 > max_length:
      if len(cont) > max_length:
        raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={max_length}")
      seq = seq[-(max_length + 1):]
    rows.append((seq[:-1], seq[1:]))
    spans.append(len(cont))
  scored = score(model, rows, batch_size=batch_size, progress=progress, pad_id=pad_id)
  return [(float(lp[-n:].sum()), bool(g[-n:].all())) for (lp, g), n in zip(scored, spans)]


def generate_until(model: nnx.Module, contexts: Sequence[str], until: Sequence[Sequence[str]],
                   max_new_tokens: Sequence[int], *, batch_size: int = 8,
                   progress: Progress | None = None,
                   tokenizer: Tokenizer | None = None) -> list[str]:
  """Greedy continuations (KV cache) of BOS-prefixed contexts, cut at the tokenizer's
  stop ids and the stop strings."""
  tok = resolve(tokenizer)
  prompts = [tok.encode(c, bos=True) for c in contexts]
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  out = [""] * len(prompts)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    ids = sample_lib.generate_ids(model, [prompts[i] for i in idx],
                                  max_new_tokens=max(max_new_tokens[i] for i in idx),
                                  eos_ids=tok.stop_ids, pad_id=tok.pad_id)
    for row, i in zip(ids, idx):
      text = sample_lib.text_until_stop(row[:max_new_tokens[i]], tok)
      out[i] = tasks_lib.cut_at_stop(text, until[i])
    if progress:
      progress.update(len(idx))
  return out


# --- statistics ------------------------------------------------------------------


def bootstrap_stderr(statistic: Callable[..., np.ndarray], *arrays: np.ndarray,
                     resamples: int = 1000, seed: int = 0) -> float | None:
  """Bootstrap standard error of ``statistic`` over the leading axis of ``arrays``.

  ``statistic`` maps resampled arrays [R, n] to [R] values (e.g.
  ``lambda x: x.mean(-1)``). None when there are fewer than 2 examples.
  """
  n = len(arrays[0])
  if n < 2:
    return None
  idx = np.random.default_rng(seed).integers(0, n, (resamples, n))
  return float(np.std(statistic(*(np.asarray(a)[idx] for a in arrays)), ddof=1))


def _mean_metrics(values: dict[str, np.ndarray], resamples: int, seed: int) -> tuple[dict, dict]:
  metrics = {k: float(np.mean(v)) for k, v in values.items()}
  stderr = {k: bootstrap_stderr(lambda x: x.mean(-1), v, resamples=resamples, seed=seed)
            for k, v in values.items()}
  return metrics, stderr


# --- held-out perplexity -----------------------------------------------------------


def window_rows(tokens: np.ndarray, window: int, stride: int | None = None):
  """Rows (inputs, targets, scored mask) covering targets x[1:] once each (module doc)."""
  stride = window if stride is None else stride
  if not 1 <= stride <= window:
    raise ValueError(f"stride must be in [1, window={window}], got {stride}")
  n = len(tokens) - 1
  rows, start, scored = [], 0, 0
  while scored < n:
    end = min(start + window, n)
    mask = np.arange(start + 1, end + 1) > scored
    rows.append((tokens[start:end], tokens[start + 1:end + 1], mask))
    scored, start = end, start + stride
  return rows


def heldout_perplexity(model: nnx.Module, documents: Sequence[np.ndarray], *, window: int,
                       stride: int | None = None, batch_size: int = 8,
                       resamples: int = 1000, seed: int = 0,
                       progress: Progress | None = None,
                       tokenizer: Tokenizer | None = None) -> tuple[dict, dict, dict]:
  """Token- and byte-level perplexity of documents in ``tokenizer``'s ids (default
  bytes; BOS first where it has one) (module doc).

  Returns (metrics, bootstrap stderr over documents, per-document sums
  {"nll", "tokens", "byte_nll", "bytes"} as lists: for paired comparisons).
  """
  rows, owner = [], []
  for d, doc in enumerate(documents):
    for inputs, targets, mask in window_rows(np.asarray(doc, np.int32), window, stride):
      rows.append((inputs, targets, mask))
      owner.append(d)
  tok = resolve(tokenizer)
  token_bytes = tok.token_bytes()
  scored = score(model, [(r[0], r[1]) for r in rows], batch_size=batch_size, progress=progress,
                 pad_id=tok.pad_id)
  sums = np.zeros((len(documents), 4))   # nll, targets, byte nll, bytes
  for (inputs, targets, mask), (lp, _), d in zip(rows, scored, owner):
    nbytes = token_bytes[targets] * mask
    sums[d] += [-lp[mask].sum(), mask.sum(), -lp[nbytes > 0].sum(), nbytes.sum()]
  nll, count, bnll, nbytes = sums.T
  per_tok = lambda a, b: a.sum(-1) / b.sum(-1)
  bpb = lambda a, b: a.sum(-1) / LN2 / b.sum(-1)
  metrics = {"nll": per_tok(nll, count), "bits_per_byte": bpb(bnll, nbytes)}
  metrics.update(perplexity=math.exp(metrics["nll"]),
                 byte_perplexity=2.0 ** metrics["bits_per_byte"],
                 tokens=int(count.sum()), bytes=int(nbytes.sum()), documents=len(documents),
                 windows=len(rows))
  stderr = {"nll": bootstrap_stderr(per_tok, nll, count, resamples=resamples, seed=seed),
            "bits_per_byte": bootstrap_stderr(bpb, bnll, nbytes, resamples=resamples,
                                              seed=seed)}
  per_document = {"nll": nll.tolist(), "tokens": count.tolist(), "byte_nll": bnll.tolist(),
                  "bytes": nbytes.tolist()}
  return ({k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()},
          stderr, per_document)


def protocol(kind: str, window: int, stride: int) -> str:
  metrics = ("nll/perplexity per token incl. EOS, bits_per_byte = NLL in bits of the targets "
             "that stand for text over their UTF-8 bytes (special tokens such as EOS excluded)")
  if kind == "disjoint":
    return (f"disjoint windows of {window} tokens per document (lm-eval rolling "
            "loglikelihood): every target predicted once, a window's first prediction "
            f"sees 1 token of context; {metrics}")
  return (f"sliding windows of {window} tokens, stride {stride}, per document: every target "
          f"predicted once with >= {window - stride} tokens of context (fewer at a "
          f"document's start); {metrics}")


def heldout_documents(run_config, heldout_cfg, max_documents: int | None = None,
                      tokenizer: Tokenizer | None = None):
  """(token documents, corpus fingerprint, source) of the held-out text, in
  ``tokenizer``'s ids (default bytes).

  Documents in order, each cut to its first ``max_doc_tokens`` (0: whole),
  until ``max_tokens`` in all (the last one cut to fit) or ``max_documents``.
  """
  if heldout_cfg.path:
    docs = data_lib.text_documents([p for p in heldout_cfg.path.split(",") if p])
    stream = data_lib.TokenStream.from_documents(docs, tokenizer)
    fingerprint, source = None, heldout_cfg.path
  else:
    if run_config is None:
      raise ConfigError("heldout.path", "the checkpoint records no data config: "
                        "give held-out text files")
    corpus = data_lib.Corpus.from_config(run_config.data, tokenizer)
    stream, fingerprint = corpus.heldout, corpus.fingerprint
    source = f"held-out split of the run's {run_config.data.source} corpus"
  bounds = list(stream.starts) + [stream.tokens.size]
  docs, budget = [], heldout_cfg.max_tokens
  for a, b in zip(bounds[:-1], bounds[1:]):
    if budget <= 1 or (max_documents and len(docs) >= max_documents):
      break
    n = min(b - a, budget, heldout_cfg.max_doc_tokens or b - a)
    doc = stream.tokens[a:a + n].astype(np.int32)
    docs.append(doc)
    budget -= doc.size
  cap = heldout_cfg.max_doc_tokens
  source += (f": the first {len(docs)} documents in order"
             f"{f', each cut to its first {cap} tokens' if cap else ''}, "
             f"{sum(d.size for d in docs)} tokens")
  return docs, fingerprint, source


# --- synthetic suites ----------------------------------------------------------------


def suite(name: str, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> list:
  """The task settings of synthetic suite ``name`` from its config block.

  MQAR skips (num_pairs, seq_len) pairs that do not fit; any other setting
  that cannot be generated (in ``tokenizer``'s ids, default bytes) is a
  ConfigError.
  """
  tok = resolve(tokenizer)
  if name == "mqar":
    try:
      synthetic.require_bytes(tok, name)
    except ValueError as e:
      raise ConfigError("tasks", str(e)) from None
    grid = [synthetic.MQAR(num_pairs=p, seq_len=L, key_len=cfg.key_len)
            for L in cfg.seq_lens for p in cfg.num_pairs]
    tasks = [t for t in grid if _error(t, tok) is None]
    if not tasks:
      raise ConfigError("mqar.seq_lens", f"no setting fits: {_error(grid[0], tok)}")
    return tasks
  if name == "passkey":
    tasks = [synthetic.Passkey(context_len=c, depth=d, digits=cfg.digits)
             for c in cfg.context_lens for d in cfg.depths]
    key = "passkey.context_lens"
  elif name in ("parity", "modcount"):
    modulus = 2 if name == "parity" else cfg.modulus
    tasks = [synthetic.Counting(length=n, modulus=modulus, running=cfg.running)
             for n in cfg.lengths]
    key = f"{name}.lengths"
  elif name == "arithmetic":
    tasks = [synthetic.Arithmetic(digits=d, reverse=cfg.reverse) for d in cfg.digits]
    key = "arithmetic.digits"
  else:
    raise ValueError(f"unknown synthetic suite {name!r}")
  for t in tasks:
    if _error(t, tok) is not None:
      raise ConfigError(key, _error(t, tok))
  return tasks


def _error(task, tokenizer: Tokenizer) -> str | None:
  try:
    synthetic.example(task, 0, 0, tokenizer)
    return None
  except ValueError as e:
    return str(e)


def evaluate_synthetic(model: nnx.Module, task, *, num_examples: int, seed: int = 0,
                       batch_size: int = 8, resamples: int = 1000,
                       progress: Progress | None = None,
                       tokenizer: Tokenizer | None = None) -> tuple[dict, dict]:
  """(metrics, stderr) of one synthetic setting: acc (example) and token_acc (answer token)."""
  tok = resolve(tokenizer)
  exs = synthetic.examples(task, seed, num_examples, tokenizer=tok)
  scored = score(model, [(e.inputs, e.targets) for e in exs], batch_size=batch_size,
                 progress=progress, pad_id=tok.pad_id)
  acc, tok_ok, tok_n = [], [], []
  for e, (_, greedy) in zip(exs, scored):
    ok = greedy[e.loss_mask > 0]
    acc.append(float(ok.all()))
    tok_ok.append(float(ok.sum()))
    tok_n.append(float(ok.size))
  acc, tok_ok, tok_n = map(np.asarray, (acc, tok_ok, tok_n))
  ratio = lambda a, b: a.sum(-1) / b.sum(-1)
  return ({"acc": float(acc.mean()), "token_acc": float(ratio(tok_ok, tok_n))},
          {"acc": bootstrap_stderr(lambda x: x.mean(-1), acc, resamples=resamples, seed=seed),
           "token_acc": bootstrap_stderr(ratio, tok_ok, tok_n, resamples=resamples,
                                         seed=seed)})


# --- running a list of tasks -------------------------------------------------------------


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first eval-config key that cannot work."""
  def need(cond, key, msg):
    if not cond:
      raise ConfigError(key, msg)

  need(cfg.bootstrap_resamples >= 2, "bootstrap_resamples",
       f"must be >= 2, got {cfg.bootstrap_resamples}")
  h = cfg.heldout
  need(h.window >= 0, "heldout.window", f"must be >= 0 (0: the run's seq_len), got {h.window}")
  need(h.stride >= 1 and (h.window == 0 or h.stride <= h.window), "heldout.stride",
       f"must be in [1, heldout.window], got {h.stride}")
  need(h.max_tokens >= 2, "heldout.max_tokens", f"must be >= 2, got {h.max_tokens}")
  need(h.max_doc_tokens == 0 or h.max_doc_tokens >= 2, "heldout.max_doc_tokens",
       f"must be 0 (whole documents) or >= 2, got {h.max_doc_tokens}")
  need(cfg.tasks.max_length >= 0, "tasks.max_length", f"must be >= 0, got {cfg.tasks.max_length}")
  need(cfg.tasks.max_new_tokens >= 1, "tasks.max_new_tokens",
       f"must be >= 1, got {cfg.tasks.max_new_tokens}")
  for name in SYNTHETIC_TASKS:
    need(cfg[name].num_examples >= 1, f"{name}.num_examples",
         f"must be >= 1, got {cfg[name].num_examples}")
  need(all(0.0 <= d <= 1.0 for d in cfg.passkey.depths), "passkey.depths",
       f"must lie in [0, 1], got {cfg.passkey.depths}")
  need(2 <= cfg.modcount.modulus <= 10, "modcount.modulus",
       f"must be in [2, 10], got {cfg.modcount.modulus}")
  for key, values in [("mqar.num_pairs", cfg.mqar.num_pairs), ("mqar.seq_lens", cfg.mqar.seq_lens),
                      ("passkey.context_lens", cfg.passkey.context_lens),
                      ("parity.lengths", cfg.parity.lengths),
                      ("modcount.lengths", cfg.modcount.lengths),
                      ("arithmetic.digits", cfg.arithmetic.digits)]:
    need(len(values) > 0 and all(v >= 1 for v in values), key,
         f"must be a non-empty list of positive ints, got {values}")


def default_config() -> ml_collections.ConfigDict:
  return config_lib.load_file(DEFAULT_EVAL_CONFIG)


def task_file_path(name: str) -> pathlib.Path:
  """A task name: a .jsonl path, or the stem of a file in experiments/tasks/."""
  p = pathlib.Path(name)
  if p.suffix == ".jsonl":
    return p if p.exists() or p.is_absolute() else REPO_ROOT / p
  return REPO_ROOT / "experiments" / "tasks" / f"{name}.jsonl"


def check_task_names(names: Sequence[str]) -> None:
  for name in names:
    if name not in HELDOUT_TASKS and name not in SYNTHETIC_TASKS and \
        not task_file_path(name).is_file():
      known = sorted(HELDOUT_TASKS) + list(SYNTHETIC_TASKS)
      raise ConfigError("tasks", f"unknown task {name!r}: not one of {known} and no file "
                        f"{task_file_path(name)}")


def evaluate(model: nnx.Module, names: Sequence[str], *, run_config=None,
             eval_config: ml_collections.ConfigDict | None = None, batch_size: int = 8,
             max_examples: int | None = None, show_progress: bool = True,
             tokenizer: Tokenizer | None = None) -> dict:
  """Runs the named tasks with texts in ``tokenizer``'s ids (default bytes); returns
  {"rows": [...], "fingerprint": ...}.

  Each row is {"task", "setting", "n", "metrics", "stderr"} (plus
  "protocol" for perplexity and "examples" for task files).
  """
  tokenizer = resolve(tokenizer)
  cfg = eval_config or default_config()
  validate_config(cfg)
  check_task_names(names)
  res, seed = cfg.bootstrap_resamples, cfg.seed
  rows, fingerprint, heldout = [], None, None
  for name in names:
    if name in HELDOUT_TASKS:
      kind = HELDOUT_TASKS[name]
      window = cfg.heldout.window or (run_config.data.seq_len if run_config else 0)
      if window < 1:
        raise ConfigError("heldout.window", "the checkpoint records no seq_len: set it")
      stride = window if kind == "disjoint" else min(cfg.heldout.stride, window)
      heldout = heldout or heldout_documents(run_config, cfg.heldout, max_examples, tokenizer)
      docs, fingerprint, source = heldout
      total = sum(len(window_rows(d, window, stride)) for d in docs)
      bar = Progress(total, name, show_progress)
      metrics, stderr, per_document = heldout_perplexity(
          model, docs, window=window, stride=stride, batch_size=batch_size, resamples=res,
          seed=seed, progress=bar, tokenizer=tokenizer)
      bar.close()
      rows.append({"task": name, "setting": {"window": window, "stride": stride},
                   "n": len(docs), "metrics": metrics, "stderr": stderr,
                   "protocol": protocol(kind, window, stride), "source": source,
                   "per_document": per_document})
    elif name in SYNTHETIC_TASKS:
      block = cfg[name]
      n = min(block.num_examples, max_examples or block.num_examples)
      settings = suite(name, block, tokenizer)
      bar = Progress(n * len(settings), name, show_progress)
      for task in settings:
        metrics, stderr = evaluate_synthetic(model, task, num_examples=n, seed=seed,
                                             batch_size=batch_size, resamples=res,
                                             progress=bar, tokenizer=tokenizer)
        rows.append({"task": name, "setting": task.setting(), "n": n, "metrics": metrics,
                     "stderr": stderr})
      bar.close()
    else:
      rows.append(_task_file_row(model, task_file_path(name), cfg, batch_size, max_examples,
                                 show_progress, tokenizer))
  return {"rows": rows, "fingerprint": fingerprint}


def _task_file_row(model, path, cfg, batch_size, max_examples, show_progress,
                   tokenizer: Tokenizer) -> dict:
  task = tasks_lib.load(path)
  n = min(len(task.records), max_examples or len(task.records))
  calls = (sum(len(r["choices"]) for r in task.records[:n])
           if task.type == "multiple_choice" else n)
  bar = Progress(calls, task.name, show_progress)

  def ll(pairs):
    reqs = [(tokenizer.encode(c, bos=True), tokenizer.encode(x)) for c, x in pairs]
    return loglikelihood(model, reqs, batch_size=batch_size, max_length=cfg.tasks.max_length,
                         progress=bar, pad_id=tokenizer.pad_id)

  def gen(contexts, until, max_new):
    return generate_until(model, contexts, until, max_new, batch_size=batch_size, progress=bar,
                          tokenizer=tokenizer)

  values, examples = tasks_lib.evaluate(task, ll, gen, max_examples=n,
                                        default_max_new_tokens=cfg.tasks.max_new_tokens)
  bar.close()
  metrics, stderr = _mean_metrics(values, cfg.bootstrap_resamples, cfg.seed)
  return {"task": task.name, "setting": {"type": task.type, "file": _rel(task.path)}, "n": n,
          "metrics": metrics, "stderr": stderr, "examples": examples}


def _rel(path) -> str:
  p = pathlib.Path(path).absolute()
  return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


# --- checkpoints and the report ----------------------------------------------------------


def git_commit() -> tuple[str | None, bool | None]:
  """(HEAD commit, working tree has changes) of the repository, or (None, None)."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
    return head, bool(dirty.strip())
  except (OSError, subprocess.SubprocessError):
    return None, None


def run(checkpoint: str, names: Sequence[str], *, step: int | None = None,
        eval_config: ml_collections.ConfigDict | None = None, batch_size: int = 8,
        max_examples: int | None = None, show_progress: bool = True,
        tokenizer: Tokenizer | None = None) -> dict:
  """Loads a checkpoint, evaluates ``names`` and returns the full report (JSON-ready).

  ``checkpoint``: a run, one of its checkpoints or a Hugging Face directory
  (``gemkit.runs.load_source``; a Hugging Face directory has no data config,
  so held-out tasks need ``heldout.path``). ``tokenizer``: default the
  checkpoint's own (the run's recorded one, bytes for runs that record none).
  """
  cfg = eval_config or default_config()
  validate_config(cfg)
  check_task_names(names)
  loaded = runs.load_source(checkpoint, step)
  tokenizer = tokenizer or loaded.tokenizer
  start = time.perf_counter()
  out = evaluate(loaded.model, names, run_config=loaded.config, eval_config=cfg,
                 batch_size=batch_size, max_examples=max_examples, show_progress=show_progress,
                 tokenizer=tokenizer)
  commit, dirty = git_commit()
  settings = {
      "checkpoint": str(checkpoint), "workdir": loaded.path, "step": loaded.step,
      "tasks": list(names), "batch_size": batch_size, "max_examples": max_examples,
      "model_config": loaded.meta.get("model"),
      "run_config": loaded.config.to_dict() if loaded.config is not None else None,
      "eval_config": cfg.to_dict(),
      "tokenizer": tokenizer.describe(), "corpus_fingerprint": out["fingerprint"],
      "checkpoint_corpus_fingerprint": loaded.meta.get("corpus_fingerprint"),
      "git_commit": commit, "git_dirty": dirty, "jax_version": jax.__version__,
      "machine": metrics.machine(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "eval_seconds": round(time.perf_counter() - start, 1),
  }
  return {"settings": settings, "results": out["rows"]}


def _fmt(v: float | None) -> str:
  if v is None:
    return ""
  return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


def markdown_table(rows: Sequence[dict]) -> str:
  """One line per result row: task | setting | n | metric ± stderr ..."""
  lines = ["| task | setting | n | metrics (± bootstrap s.e.) |", "|---|---|---:|---|"]
  for r in rows:
    setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
    parts = []
    for k, v in r["metrics"].items():
      if not isinstance(v, float):
        continue
      se = r["stderr"].get(k)
      parts.append(f"{k} {_fmt(v)}" + (f" ± {_fmt(se)}" if se is not None else ""))
    lines.append(f"| {r['task']} | {setting} | {r['n']} | {'; '.join(parts)} |")
  return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------

# task -> (x setting, series setting, metric, x label)
_ACCURACY_PLOTS = {
    "passkey": ("context_len", "depth", "acc", "context length (tokens)"),
    "mqar": ("seq_len", "num_pairs", "token_acc", "sequence length (tokens)"),
    "parity": ("length", None, "acc", "bits"),
    "modcount": ("length", "modulus", "acc", "bits"),
    "arithmetic": ("digits", "reverse", "acc", "operand digits"),
}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_accuracy(rows: Sequence[dict], task: str, path: str | pathlib.Path) -> pathlib.Path | None:
  """Accuracy vs length of a synthetic suite, one line per series value (with s.e. bars)."""
  x_key, series_key, metric, label = _ACCURACY_PLOTS[task]
  rows = [r for r in rows if r["task"] == task]
  if not rows:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  groups: dict = {}
  for r in rows:
    groups.setdefault(r["setting"].get(series_key) if series_key else None, []).append(r)
  for key, group in groups.items():
    group = sorted(group, key=lambda r: r["setting"][x_key])
    ax.errorbar([r["setting"][x_key] for r in group], [r["metrics"][metric] for r in group],
                yerr=[r["stderr"][metric] or 0.0 for r in group], marker="o", capsize=3,
                label=None if series_key is None else f"{series_key}={key}")
  if task in ("passkey", "mqar"):
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["setting"][x_key] for r in rows}))
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set(xlabel=label, ylabel=metric, ylim=(-0.03, 1.03), title=f"{task}: {metric} vs length")
  if series_key:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_loss_curves(metrics_path: str | pathlib.Path, path: str | pathlib.Path
                     ) -> pathlib.Path | None:
  """Train and eval loss vs step from a run's metrics.jsonl."""
  metrics_path = pathlib.Path(metrics_path)
  if not metrics_path.is_file():
    return None
  records = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for split, style in (("train", "-"), ("eval", "o-")):
    pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
    if pts:
      ax.plot(*zip(*pts), style, label=f"{split} loss")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"loss curves: {metrics_path.parent}")
  ax.legend()
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_bpb_variants(variants: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
  """Bars of bits-per-byte (± s.e.) per variant (``compare_bpb`` entries), e.g. float
  vs quantized; each label also shows the paired difference to the first variant."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.3 * len(variants) + 2, 4.2))
  labels = [v["label"] + (f"\nΔ {v['delta']:+.5f}" if v.get("delta") is not None else "")
            + (f"\n± {v['delta_stderr']:.5f}" if v.get("delta_stderr") is not None else "")
            for v in variants]
  variants = [(v["label"], v["bits_per_byte"], v["stderr"]) for v in variants]
  ax.bar(labels, [v[1] for v in variants], yerr=[v[2] or 0.0 for v in variants], capsize=4)
  for i, v in enumerate(variants):
    ax.annotate(f"{v[1]:.4f}", (i, v[1]), ha="center", va="top", fontsize=8, color="white",
                xytext=(0, -4), textcoords="offset points")
  ax.set(ylabel="held-out bits per byte", title="bits per byte by variant")
  return _save(fig, path)


def compare_bpb(pairs: Sequence[tuple[str, str]], *, eval_config=None, batch_size: int = 8,
                max_examples: int | None = None, task: str = "heldout_bpb",
                show_progress: bool = True) -> list[dict]:
  """Held-out bits-per-byte of each (label, checkpoint), same protocol and documents.

  Each variant after the first also gets ``delta`` = its bpb minus the
  first's, with a paired bootstrap standard error (the same resampled
  documents for both), far tighter than either figure's own error bar.
  """
  out, base = [], None
  cfg = eval_config or default_config()
  for label, checkpoint in pairs:
    report = run(checkpoint, [task], eval_config=cfg, batch_size=batch_size,
                 max_examples=max_examples, show_progress=show_progress)
    row = report["results"][0]
    docs = {k: np.asarray(v) for k, v in row["per_document"].items()}
    entry = {"label": label, "checkpoint": checkpoint, "step": report["settings"]["step"],
             "bits_per_byte": row["metrics"]["bits_per_byte"],
             "stderr": row["stderr"]["bits_per_byte"], "protocol": row["protocol"],
             "source": row["source"], "delta": None, "delta_stderr": None}
    if base is None:
      base = docs
    elif np.array_equal(base["bytes"], docs["bytes"]):
      bpb = lambda a, b: a.sum(-1) / LN2 / b.sum(-1)
      diff = lambda a, b, c, d: bpb(a, b) - bpb(c, d)
      entry["delta"] = float(diff(docs["byte_nll"], docs["bytes"], base["byte_nll"],
                                  base["bytes"]))
      entry["delta_stderr"] = bootstrap_stderr(
          diff, docs["byte_nll"], docs["bytes"], base["byte_nll"], base["bytes"],
          resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    out.append(entry)
  return out


def write_plots(report: dict, plots_dir: str | pathlib.Path,
                variants: Sequence[dict] = ()) -> list[pathlib.Path]:
  """Every plot the report supports: accuracy vs length, loss curves, bpb by variant."""
  plots_dir = pathlib.Path(plots_dir)
  made = [plot_accuracy(report["results"], t, plots_dir / f"{t}.png") for t in _ACCURACY_PLOTS]
  workdir = report["settings"].get("workdir")
  if workdir:
    made.append(plot_loss_curves(pathlib.Path(workdir) / "metrics.jsonl",
                                 plots_dir / "loss_curves.png"))
  if variants:
    made.append(plot_bpb_variants(variants, plots_dir / "bpb_variants.png"))
  return [p for p in made if p is not None]


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return path
