"""Passkey retrieval with dense, top-k block and sliding-window attention.

The task (Mohtashami & Jaggi 2023, "Landmark Attention"), on bytes: a pass key
planted at a random depth of a span of the default corpus (Python stdlib
sources), asked for at the end::

  BOS  haystack[:a]  "\\nThe pass key is $K. Remember it. $K is the pass key.\\n"
       haystack[a:]  "\\nWhat is the pass key? The pass key is $"  "K."

Digit i of the 5-digit key K is written as the byte ``key_offset +
key_stride * i + d`` (default 128 + 10 i + d: one alphabet per position, bytes
the haystack never holds, as its bytes >= 128 become "?"), so each answer
digit is one content lookup ("the symbol of alphabet i") rather than an
induction chain over the ~7 copies of each ASCII digit in 4K bytes of
source code (with ASCII keys this model never got past 0 whole keys).

``benchmarks/passkey.py`` trains one byte-level transformer per pattern of
``passkey.patterns`` and prints retrieval accuracy and time per training
step (README "Sparse attention"):

1. shared, dense, ``passkey.pretrain`` stages (256 then 1K bytes): the model
   learns the byte LM and the lookup. ``rope_theta`` = 1e6 keeps the
   lookup content-based: at 10,000 the model trained to 896 bytes found the
   first digit of 0.25 of keys at 4K; at 1e6 the one trained to 1K finds all.
2. per pattern, from the shared weights, ``train.steps`` steps at
   ``data.seq_len`` = 4K bytes (one row per step) with the pattern on.

Then each model is asked for held-out keys at ``eval_lens`` bytes.

Patterns, all with the same key budget per query block at 4K bytes (blocks
of 16): the ``topk*`` patterns keep ``top_k`` = 62 selected blocks plus a
local and a sink block, 64 of 256 (1/4); ``sliding`` keeps a window of 1,024
keys. They differ in how a query block ranks the kv blocks:

- ``topk``: block-mean query against block-mean key (MoBA's gate averaged
  over the query block), as the issue specifies.
- ``topk_quest``: Quest's bound ``sum_d max(q_d kmin_d, q_d kmax_d)`` per
  query row, summed over the block's rows and the GQA group
  (``ops.attention.quest_scores``), the criterion decode pages use too.
- ``topk_quest_nsa``: the same, plus NSA's compressed branch (mean pooling,
  ``models.transformer.compressed_attention``) added through a gate.
- ``topk_nsa``: the compressed branch's probabilities rank the blocks.

Block sizes matter: with blocks of 64 (keep 16 of 64) the key's few bytes
are 1/10 of a block mean and ``topk_nsa`` reached 0.38 of first digits
after 450 steps at 4K; with blocks of 16 it reached 0.81 after 200.

Deviations from the issue, forced by a 2-core CPU: a 2-layer model with
d_model 128; training contexts up to 4K bytes (evaluation at 4K and 8K,
where the fixed ``top_k`` keeps 1/8 of the blocks).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import lm_tiny
from gemkit.data import BOS

MARK = "$"   # before every key: a byte that is rare in the corpus (0.07 per 2K bytes)
QUESTION = "\nWhat is the pass key? The pass key is " + MARK


def get_config() -> ml_collections.ConfigDict:
  c = lm_tiny.get_config()
  c.name = "passkey"
  c.seed = 0
  m = c.model
  m.num_layers = 2
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.mlp_dim = 384
  m.rope_theta = 1e6                # slow rotations: a content lookup that holds over 4K+
  m.attention = "dense"             # set per pattern by benchmarks/passkey.py
  m.block_size = 16
  m.top_k = 62                      # + 1 local + 1 sink = 64 of the 256 blocks of 4K bytes
  m.local_blocks = 1
  m.sink_blocks = 1
  m.topk_scores = "mean"            # set per pattern (topk: mean, topk_nsa: compressed)
  m.query_block = 0                 # topk: query rows per selection (0: block_size)
  m.window = 1024                   # sliding: as many keys as top-k keeps

  c.data.seq_len = 4096             # stage 2 training context (bytes)
  c.train.steps = 300               # stage 2 steps per pattern
  c.train.batch_size = 1
  c.train.lr = 2e-3
  c.train.warmup_steps = 5
  c.train.log_every = 10

  c.passkey = ml_collections.ConfigDict()
  c.passkey.patterns = "dense,topk_quest,topk_quest_nsa,topk,sliding"  # benchmarks/passkey.py
  c.passkey.digits = 5
  c.passkey.distinct_digits = False  # True: keys of 5 different digits
  c.passkey.key_offset = 128        # digit d at position i of the key is the byte
  c.passkey.key_stride = 10         #   key_offset + key_stride * i + d (48, 0: ASCII)
  c.passkey.min_len = 0             # > 0: rows packed with documents of min_len..len bytes
  c.passkey.lm_weight = 1.0         # loss weight of the haystack bytes
  c.passkey.train_questions = 1     # extra question-answer pairs after the needle (training)
  c.passkey.answer_weight = 50.0    # loss weight of each key byte to copy
  # Stage 1 (shared, dense): "BYTESxROWSxSTEPS" per stage, comma-separated ("": none).
  c.passkey.pretrain = "256x8x300,1024x4x300"
  c.passkey.pretrain_lr = 3e-3
  c.passkey.probe_every = 100       # stage 1: held-out accuracy at its length every N steps
  c.passkey.eval_lens = "4096,8192"  # held-out context lengths (bytes)
  c.passkey.eval_examples = 24      # per length, depths spread evenly over [0, 1]
  c.passkey.eval_batch = 4
  return c


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


def make_key(rng: np.random.Generator, p: ml_collections.ConfigDict) -> str:
  """A random key of ``p.digits`` symbols, the i-th ``chr(p.key_offset + p.key_stride * i
  + d)`` for a digit d in 0..9 (offset 48, stride 0: decimal digits), the first with
  d != 0; all digits different if ``p.distinct_digits``."""
  if p.distinct_digits:
    if not 1 <= p.digits <= 10:
      raise ValueError(f"digits must be in 1..10 for distinct digits, got {p.digits}")
    first = int(rng.integers(1, 10))
    ds = [first] + rng.permutation([d for d in range(10) if d != first])[:p.digits - 1].tolist()
  else:
    ds = [int(c) for c in str(rng.integers(10 ** (p.digits - 1), 10 ** p.digits))]
  return "".join(chr(p.key_offset + p.key_stride * i + d) for i, d in enumerate(ds))


def needle(key: str) -> str:
  return f"\nThe pass key is {MARK}{key}. Remember it. {MARK}{key} is the pass key.\n"


def _bytes(s: str) -> np.ndarray:
  return np.frombuffer(s.encode("latin-1"), np.uint8).astype(np.int32)


def example(tokens: np.ndarray, rng: np.random.Generator, length: int,
            p: ml_collections.ConfigDict, depth: float | None = None,
            questions: int = 0) -> tuple[np.ndarray, list[int], str]:
  """One passkey document of ``length + 1`` tokens from the corpus ``tokens``.

  BOS, a random span of ``tokens`` (ids >= 256, document breaks, become
  newlines; bytes >= 128, a few in the corpus, become "?" so that no key
  symbol occurs in the haystack) with a needle holding the key of
  ``make_key(rng, p)`` at ``depth`` of it (None: uniform), ``questions``
  question-answer pairs at uniformly random places after the needle, then
  the final question, the key and ".".

  Returns (tokens [length + 1] int32, key starts to train on: the needle's
  second copy of the key (a short-range copy, which teaches the induction head
  that the long-range answers need) and each answer, the last one final; key).
  """
  key = make_key(rng, p)
  qa = QUESTION + key + "."
  hay_len = length - len(needle(key)) - (questions + 1) * len(qa)
  if hay_len < 0:
    raise ValueError(f"length {length} is too short for the needle and {questions + 1} "
                     "questions")
  start = int(rng.integers(0, tokens.size - hay_len + 1))
  hay = tokens[start:start + hay_len].astype(np.int32)
  hay = np.where(hay >= 256, ord("\n"), np.where(hay >= 128, ord("?"), hay))
  at = int(rng.integers(0, hay_len + 1)) if depth is None else int(round(depth * hay_len))
  cuts = [at] + sorted(rng.integers(at, hay_len + 1, questions).tolist()) + [hay_len]
  pieces = [np.array([BOS], np.int32), hay[:at], _bytes(needle(key))]
  keys = [1 + at + needle(key).rindex(MARK) + 1]  # the needle's second copy of the key
  for lo, hi in zip(cuts[:-1], cuts[1:]):       # haystack, then a question and its answer
    pieces.append(hay[lo:hi])
    keys.append(sum(x.size for x in pieces) + len(QUESTION))
    pieces.append(_bytes(qa))
  return np.concatenate(pieces), keys, key


def train_row(tokens: np.ndarray, rng: np.random.Generator, seq_len: int,
              p: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """One training row of ``seq_len`` inputs: passkey documents of uniformly
  random lengths in [min_len, seq_len] (min_len 0: one document), segment ids
  1, 2, ..., loss weight ``lm_weight`` on haystack bytes and ``answer_weight``
  on the key bytes after each question and on the needle's second key; the
  first target of each document
  (its first byte, predicted from BOS) has weight ``lm_weight`` too."""
  min_len = p.min_len or seq_len
  toks, seg, weight, left = [], [], [], seq_len + 1
  while left:
    n = int(rng.integers(min_len, seq_len + 1))
    n = left if left - n < min_len else min(n, left)
    doc, keys, _ = example(tokens, rng, n - 1, p, questions=p.train_questions)
    w = np.full(n, p.lm_weight, np.float32)
    for k in keys:
      w[k:k + p.digits] = p.answer_weight
    w[0] = 0.0                                  # BOS follows another document
    toks.append(doc)
    seg.append(np.full(n, len(seg) + 1, np.int32))
    weight.append(w)
    left -= n
  toks, seg, weight = (np.concatenate(x) for x in (toks, seg, weight))
  return {"inputs": toks[:-1], "targets": toks[1:], "segment_ids": seg[:-1],
          "loss_mask": weight[1:]}


def train_batch(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int,
                p: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  rows = [train_row(tokens, rng, seq_len, p) for _ in range(batch_size)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def score(pred: np.ndarray, tokens: np.ndarray, first: int, digits: int) -> np.ndarray:
  """Per-digit hits [B, digits]: ``pred`` [B, >= first - 1 + digits] is the
  argmax next token at each input position of ``tokens`` [B, N] (teacher
  forcing), whose key starts at ``first``."""
  return pred[:, first - 1:first - 1 + digits] == tokens[:, first:first + digits]
