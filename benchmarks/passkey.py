"""Passkey retrieval: dense vs top-k block vs sliding-window attention.

For each pattern of ``passkey.patterns`` (``PATTERNS``: dense, topk,
topk_quest, topk_quest_nsa, topk_nsa, sliding) a transformer is trained on
the default corpus with a pass key planted at a uniformly random depth of
every context (the task, ``gemkit.synthetic.Passkey`` on a random span of
the corpus's train split, its training stages, shared dense short contexts
then 4K bytes per pattern, and the patterns are described in
``experiments/passkey.py``). Training rows (:func:`train_row`) pack such
documents, each with ``passkey.train_questions`` extra questions; the loss is
next-byte prediction on every position, with weight ``passkey.answer_weight``
on the key bytes to copy. Evaluation plants keys in held-out spans at
``passkey.eval_examples`` depths spread evenly over [0, 1] for each length of
``passkey.eval_lens`` and reports:

- ``acc``: all key digits are the argmax of a forward pass over prompt and
  answer (teacher forcing; how ``gemkit.evaluate`` scores synthetic tasks).
  For top-k the block selection of the last query block then also sees the
  answer's queries (the forward pass selects per block of queries).
- ``first``: the same for the key's first digit alone (it can only come
  from the needle); ``digit_acc`` in the JSON has every digit.
- ``gen``: greedy generation of the whole key from the prompt alone
  (``gemkit.sample``: prefill, then one ``decode`` step per digit; every
  top-k pattern decodes with Quest page selection, plus the compressed
  branch's output where the pattern has one).

Time per training step: median wall time of the steps after the first
(compilation), each waited for, with the load average of the machine.
Prints a table and writes JSON (default
``benchmarks/results/passkey_<machine>.json``).

  python benchmarks/passkey.py --stage1 /tmp/stage1.pkl    # the README table
  python benchmarks/passkey.py --stage1 /tmp/stage1.pkl --set passkey.patterns=topk

``--stage1`` keeps the shared stage's weights (and its stats) in a file and
reuses them when the same stage is asked for again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pickle
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import models  # noqa: E402
from benchmarks import common  # noqa: E402
from gemkit import config as config_lib  # noqa: E402
from gemkit import data as data_lib  # noqa: E402
from gemkit import optim  # noqa: E402
from gemkit import sample as sample_lib  # noqa: E402
from gemkit import synthetic  # noqa: E402
from gemkit import train as train_lib  # noqa: E402


def pretrain_stages(text: str) -> list[tuple[int, int, int]]:
  """``passkey.pretrain`` -> [(bytes, rows, steps)] of the shared dense stages."""
  stages = []
  for part in filter(None, (x.strip() for x in text.split(","))):
    try:
      length, rows, steps = (int(x) for x in part.split("x"))
    except ValueError:
      length = rows = steps = 0
    if min(length, rows, steps) < 1:
      raise ValueError(f"passkey.pretrain: each stage is BYTESxROWSxSTEPS of positive ints "
                       f"(e.g. 256x8x300), got {part!r}")
    stages.append((length, rows, steps))
  return stages


def passkey_task(p, tokens: np.ndarray) -> synthetic.Passkey:
  """The task of the config block ``p`` (``passkey``) on spans of the corpus ``tokens``."""
  return synthetic.Passkey(corpus=tokens, digits=p.digits, mark=p.mark, key_offset=p.key_offset,
                           key_stride=p.key_stride, distinct_digits=p.distinct_digits)


def train_row(task: synthetic.Passkey, rng: np.random.Generator, seq_len: int,
              p) -> dict[str, np.ndarray]:
  """One training row of ``seq_len`` inputs: ``task`` documents of uniformly
  random lengths in [min_len, seq_len] (min_len 0: one document) with
  ``train_questions`` extra questions, segment ids 1, 2, ..., loss weight
  ``lm_weight`` on haystack bytes and ``answer_weight`` on the key bytes after
  each question and on the needle's second key; the first target of each
  document (its first byte, predicted from BOS) has weight ``lm_weight`` too."""
  min_len = p.min_len or seq_len
  toks, seg, weight, left = [], [], [], seq_len + 1
  while left:
    n = int(rng.integers(min_len, seq_len + 1))
    n = left if left - n < min_len else min(n, left)
    doc = dataclasses.replace(task, context_len=n - 1, depth=None,
                              questions=p.train_questions).sample(rng)
    w = np.full(n, p.lm_weight, np.float32)
    for k in doc.info["keys_at"][1:]:            # the needle's second key, then each answer
      w[k:k + p.digits] = p.answer_weight
    w[0] = 0.0                                  # BOS follows another document
    toks.append(doc.sequence)
    seg.append(np.full(n, len(seg) + 1, np.int32))
    weight.append(w)
    left -= n
  toks, seg, weight = (np.concatenate(x) for x in (toks, seg, weight))
  return {"inputs": toks[:-1], "targets": toks[1:], "segment_ids": seg[:-1],
          "loss_mask": weight[1:]}


def train_batch(task: synthetic.Passkey, rng: np.random.Generator, batch_size: int,
                seq_len: int, p) -> dict[str, np.ndarray]:
  rows = [train_row(task, rng, seq_len, p) for _ in range(batch_size)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def score(pred: np.ndarray, tokens: np.ndarray, first: int, digits: int) -> np.ndarray:
  """Per-digit hits [B, digits]: ``pred`` [B, >= first - 1 + digits] is the
  argmax next token at each input position of ``tokens`` [B, N] (teacher
  forcing), whose key starts at ``first``."""
  return pred[:, first - 1:first - 1 + digits] == tokens[:, first:first + digits]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _greedy(graphdef, params, frozen, inputs):
  model = train_lib.merge_model(graphdef, params, frozen)
  return jnp.argmax(model(inputs), -1)


def evaluate(model, graphdef, params, frozen, stream, length: int, n: int, p, seed: int,
             batch_size: int, generate: bool = True) -> dict:
  """acc (teacher-forced, all digits), first (the first digit), gen (greedy
  generation), digit_acc (per digit) and acc / first per depth quarter."""
  rng = np.random.default_rng([seed, length])
  depths = (np.arange(n) + 0.5) / n
  task = dataclasses.replace(passkey_task(p, stream.tokens), context_len=length)
  exs = [dataclasses.replace(task, depth=d).sample(rng) for d in depths]
  first = exs[0].info["keys_at"][-1]   # same layout for every example of this length
  acc, gen, digit = [], [], []
  for i in range(0, n, batch_size):
    tokens = np.stack([e.sequence for e in exs[i:i + batch_size]])
    pred = np.asarray(_greedy(graphdef, params, frozen, jnp.asarray(tokens[:, :-1])))
    hit = score(pred, tokens, first, p.digits)
    acc += list(hit.all(1))
    digit += list(hit)
    if generate:
      out = sample_lib.generate_ids(model, list(tokens[:, :first]), max_new_tokens=p.digits)
      gen += list((out == tokens[:, first:first + p.digits]).all(1))
  acc, digit = np.asarray(acc, float), np.asarray(digit, float)
  quarter = lambda x: [float(x[(depths >= q / 4) & (depths < (q + 1) / 4)].mean())
                       for q in range(4)]
  return {"acc": float(acc.mean()), "gen": float(np.mean(gen)) if gen else None,
          "first": float(digit[:, 0].mean()), "digit_acc": digit.mean(0).tolist(),
          "acc_by_depth_quarter": quarter(acc),
          "first_by_depth_quarter": quarter(digit[:, 0])}


def kv_blocks(m, length: int) -> str:
  """kv blocks the last query block of a ``length`` context visits, of all."""
  nb = -(-length // m.block_size)
  if m.attention == "topk":
    kept = min(nb, m.top_k + m.local_blocks + m.sink_blocks)
  elif m.attention == "sliding":
    kept = min(nb, -(-m.window // m.block_size) + 1)
  else:
    kept = nb
  return f"{kept}/{nb}"


def _overlay(init, params):
  """``params`` where it has a value, else ``init``: stage 2 starts from the
  stage-1 weights, and modules stage 1 lacks (the compressed branch of
  ``topk_scores="compressed"``) from their initial values."""
  if not isinstance(init, dict):
    return params
  return {k: _overlay(v, params[k]) if k in params else v for k, v in init.items()}


def train(cfg, corpus, log, tag: str, params=None, *, steps: int, seq_len: int,
          batch_size: int, lr: float | None = None,
          probe_every: int = 0) -> tuple[Any, Any, Any, dict]:
  """Trains ``cfg.model`` (from ``params`` if given) for ``steps`` on passkey rows
  of the train split; every ``probe_every`` steps logs held-out accuracy at
  ``seq_len`` (teacher forced, 16 keys). Returns (graphdef, params, frozen,
  timing, loss and probes)."""
  t = cfg.train.copy_and_resolve_references()
  t.steps = steps
  t.warmup_steps = min(t.warmup_steps, steps)
  if lr is not None:
    t.lr = lr
  model = models.build(cfg.model, rngs=nnx.Rngs(cfg.seed))
  graphdef, init, frozen = train_lib.split_model(model)
  params = init if params is None else _overlay(init, params)
  tx, schedule = optim.make_optimizer(t)
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                               opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(cfg.seed)))
  step_fn = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, tx=tx,
                                      schedule=schedule, grad_accum=1, deterministic=True))
  rng = np.random.default_rng([cfg.seed, seq_len])
  task = passkey_task(cfg.passkey, corpus.train.tokens)
  times, losses, probes = [], [], []
  start = time.perf_counter()
  for i in range(steps):
    batch = train_batch(task, rng, batch_size, seq_len, cfg.passkey)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))          # waits for the step
    times.append(time.perf_counter() - t0)
    if (i + 1) % t.log_every == 0 or i + 1 == steps:
      log(f"  {tag} step {i + 1}/{steps}  loss {np.mean(losses[-t.log_every:]):.3f}  "
          f"{statistics.median(times[1:] or times) * 1e3:.0f} ms/step  "
          f"elapsed {time.perf_counter() - start:.0f}s")
    if probe_every and ((i + 1) % probe_every == 0 or i + 1 == steps):
      model = train_lib.merge_model(graphdef, state.params, state.frozen)
      r = evaluate(model, graphdef, state.params, state.frozen, corpus.heldout, seq_len, 16,
                   cfg.passkey, cfg.seed + 2, batch_size, generate=False)
      probes.append({"step": i + 1, "acc": r["acc"], "first": r["first"],
                     "digit_acc": r["digit_acc"]})
      log(f"  {tag} step {i + 1}: held-out acc@{seq_len} {r['acc']:.2f} "
          f"first {r['first']:.2f} digits {np.round(r['digit_acc'], 2)}")
  stats = {"step_ms": statistics.median(times[1:] or times) * 1e3, "compile_s": times[0],
           "train_s": time.perf_counter() - start,
           "final_loss": float(np.mean(losses[-t.log_every:])), "probes": probes}
  return graphdef, state.params, state.frozen, stats


# pattern of ``passkey.patterns`` -> model config
PATTERNS = {"dense": {"attention": "dense"}, "sliding": {"attention": "sliding"},
            "topk": {"attention": "topk", "topk_scores": "mean"},
            "topk_quest": {"attention": "topk", "topk_scores": "quest"},
            "topk_quest_nsa": {"attention": "topk", "topk_scores": "quest",
                               "compressed_branch": True},
            "topk_nsa": {"attention": "topk", "topk_scores": "compressed",
                         "compressed_branch": True}}


def run_pattern(config, pattern: str, corpus, log, params=None) -> dict:
  """Trains (from ``params``: the shared short-context stage) and evaluates one pattern."""
  cfg = config.copy_and_resolve_references()
  cfg.model.update(PATTERNS[pattern])
  config_lib.validate(cfg)
  p = cfg.passkey
  graphdef, params, frozen, stats = train(
      cfg, corpus, log, pattern, params, steps=cfg.train.steps,
      seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size)
  model = train_lib.merge_model(graphdef, params, frozen)
  lens = [int(x) for x in p.eval_lens.split(",")]
  row = {"pattern": pattern, **stats, "kv_blocks": kv_blocks(cfg.model, lens[-1]), "eval": {}}
  start = time.perf_counter()
  for length in lens:
    row["eval"][length] = evaluate(model, graphdef, params, frozen, corpus.heldout, length,
                                   p.eval_examples, p, cfg.seed + 1, p.eval_batch)
    e = row["eval"][length]
    log(f"  {pattern} acc@{length} {e['acc']:.2f} first {e['first']:.2f} gen {e['gen']:.2f}")
  row["eval_s"] = time.perf_counter() - start
  return row


# Model keys that only the patterns of stage 2 read (stage 1 is dense).
_PATTERN_ONLY = ("attention", "window", "block_size", "top_k", "local_blocks", "sink_blocks",
                 "topk_scores", "compressed_branch", "query_block", "s2_group", "global_tokens",
                 "attention_impl")


def stage1_key(config) -> str:
  """What the shared dense stage depends on: seed, model (less the pattern
  keys), data and the passkey keys of the training rows."""
  model = {k: v for k, v in config.model.to_dict().items() if k not in _PATTERN_ONLY}
  task_keys = {k: v for k, v in config.passkey.items() if k.startswith("pretrain")
               or k in ("digits", "mark", "distinct_digits", "key_offset", "key_stride",
                        "min_len", "lm_weight", "train_questions", "answer_weight")}
  return json.dumps([config.seed, model, config.data.to_dict(), task_keys], sort_keys=True,
                    default=str)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/passkey.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set train.steps=50 (repeatable)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--stage1", default=None, metavar="PATH",
                      help="pickle of the shared stage's weights and stats: loaded if it "
                      "exists (for the same model, seed and passkey.pretrain* keys), else "
                      "written after training it")
  args = parser.parse_args(argv)
  try:
    config = config_lib.load(args.config, **dict(s.split("=", 1) for s in args.set))
  except config_lib.ConfigError as e:
    parser.error(str(e))
  for pattern in config.passkey.patterns.split(","):
    if pattern not in PATTERNS:
      parser.error(f"passkey.patterns: {pattern!r} is not one of {list(PATTERNS)}")
  try:
    stages = pretrain_stages(config.passkey.pretrain)
  except ValueError as e:
    parser.error(str(e))
  machine = common.machine()
  log = functools.partial(print, flush=True)
  log(f"# {machine} ({jax.default_backend()}), jax {jax.__version__}, load average "
      f"{os.getloadavg()[0]:.1f} at start; {config.train.steps} steps x "
      f"{config.train.batch_size} x {config.data.seq_len} bytes per pattern")
  corpus = data_lib.Corpus.from_config(config.data)
  p, params, pretrain = config.passkey, None, None
  key = stage1_key(config)
  if args.stage1 and os.path.exists(args.stage1):
    with open(args.stage1, "rb") as f:
      saved = pickle.load(f)
    if saved["key"] != key:
      parser.error(f"--stage1 {args.stage1} was trained with another config")
    params, pretrain = saved["params"], saved["stats"]
    log(f"# stage 1 loaded from {args.stage1} "
        f"({sum(st['train_s'] for st in pretrain):.0f} s when trained)")
  elif stages:
    cfg = config.copy_and_resolve_references()
    cfg.model.attention = "dense"
    pretrain = []
    for length, rows, steps in stages:
      _, params, _, st = train(cfg, corpus, log, f"pretrain (dense) @{length}", params,
                               steps=steps, seq_len=length, batch_size=rows,
                               lr=p.pretrain_lr, probe_every=p.probe_every)
      pretrain.append({"seq_len": length, "batch_size": rows, "steps": steps, **st})
      log(f"# pretraining: {steps} steps x {rows} x {length} bytes, "
          f"{st['step_ms']:.0f} ms/step, {st['train_s']:.0f} s")
    if args.stage1:
      with open(args.stage1, "wb") as f:
        pickle.dump({"key": key, "params": jax.device_get(params), "stats": pretrain}, f)
  rows = [run_pattern(config, pattern, corpus, log, params)
          for pattern in p.patterns.split(",")]
  lens = list(rows[0]["eval"])
  w = max(len(r["pattern"]) for r in rows)
  log(f"{'pattern':<{w}} {'kv blocks':>9} {'ms/step':>8} {'loss':>6} "
      + " ".join(f"{'acc@' + str(n):>9} {'first@' + str(n):>10} {'gen@' + str(n):>9}"
                 for n in lens)
      + f"  first@{lens[-1]} by depth quarter")
  for r in rows:
    log(f"{r['pattern']:<{w}} {r['kv_blocks']:>9} {r['step_ms']:>8.0f} {r['final_loss']:>6.3f} "
        + " ".join(f"{r['eval'][n]['acc']:>9.2f} {r['eval'][n]['first']:>10.2f} "
                   f"{r['eval'][n]['gen']:>9.2f}" for n in lens)
        + "  " + " ".join(f"{a:.2f}" for a in r["eval"][lens[-1]]["first_by_depth_quarter"]))
  meta = dict(machine=machine, backend=jax.default_backend(), jax=jax.__version__,
              argv=sys.argv[1:], config=config.to_dict(), pretrain=pretrain,
              load_average_end=os.getloadavg()[0])
  log(f"# wrote {common.write_json(dict(meta=meta, rows=rows), 'passkey', args.out)}")


if __name__ == "__main__":
  main()
