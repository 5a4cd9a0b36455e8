"""Passkey retrieval with dense, top-k block and sliding-window attention.

The task (Mohtashami & Jaggi 2023, "Landmark Attention"), on bytes: a pass key
planted at a random depth of a span of the default corpus (Python stdlib
sources), asked for at the end::

  BOS  haystack[:a]  "\\nThe pass key is $71432. Remember it. $71432 is the pass key.\\n"
       haystack[a:]  "\\nWhat is the pass key? The pass key is $"  "71432."

(the key's digits written as bytes ``key_offset + d``; 48: ASCII).
``benchmarks/passkey.py`` trains one byte-level transformer per pattern of
``passkey.patterns`` from scratch and prints retrieval accuracy and time per
training step (README "Sparse attention"). Training has two stages:

1. shared, dense, on short contexts (``pretrain_len`` bytes): the model learns
   the byte LM and to copy the key (an induction head). At this length every
   pattern below is dense attention (``top_k + local + sink`` blocks and the
   window cover the whole context), so the stage is what each pattern would
   train alone; it is run once and shared.
2. per pattern, from the shared weights, ``train.steps`` steps at
   ``data.seq_len`` bytes with ``model.attention`` set to the pattern.

Then each model is asked for held-out keys at ``eval_lens`` bytes.

Sparse keys (block_size 64): topk keeps ``top_k`` = 12 selected kv blocks
plus one local and one sink block, so a query block of a 4K context attends
to 14 of its 64 kv blocks (22%, the table's ``kv blocks``; 14 of 32 at 2K);
sliding keeps ``window`` = 896 = 14 x 64 keys, the same number.

Deviations from the issue, forced by a 2-core CPU shared with other jobs
(dense attention at 4K costs ~9 s per training step of one row there):

- contexts of 2K and 4K bytes at evaluation (the issue: 4K-16K), stage 2
  training at ``data.seq_len`` = 2K bytes, one row per step, 30 steps (the
  sparse patterns train there too, so per-step times compare like with like);
  4K is thus twice the longest trained context for every pattern;
- a 2-layer model, d_model 128;
- the score to compare patterns is ``first``, the key's first digit, besides
  the whole key (``acc``, ``gen``). The first digit follows the needle's "$"
  and can only come from the needle (chance 1/9): it measures whether
  attention reaches the needle. Within the budget this model learned that
  lookup (first digit of 32 held-out keys at 256 bytes after stage 1: 1.00;
  at 1K: 0.72) but not to chain the other digits: each is found after the
  previous digit, and the corpus has
  18 digits per 1K bytes (~7 copies of each digit in a 4K context), so a
  one-token induction head is ambiguous there. Keys of 5 different digits
  (``distinct_digits``) remove the ambiguity inside the key. Keys of bytes
  the corpus lacks (``key_offset`` = 0, bytes 0..9) were tried and learned
  more slowly in stage 1 (first symbol 0.25 at 256 bytes after 700 steps).

Positional alphabets (``key_offset`` = 128, ``key_stride`` = 10,
``distinct_digits`` = False: digit i of the key is byte 128 + 10 i + d, a
byte the haystack never holds) make each digit one content lookup ("the
symbol of alphabet i") instead of an induction chain. Measured on the same
2-core CPU (not yet the README table): stage 1 learns whole keys, 1.00 of
16 held-out keys at 256 bytes after 300 steps and 1.00 at 896 bytes after
another 50; but the lookup does not stretch to longer contexts by itself
(dense, 896 -> 4K: 0.25 of first digits), dense training at 4K costs
4.1 s per step and reached 0.56 first / 0.38 whole keys after 100 steps, and
top-k's block-mean selection (``topk_block_attention``) kept the needle's
block for the final query block in about a quarter of the heads and
examples, i.e. chance, both after dense training and after 80 steps of
top-k training at 4K (0.19 first digits). The selection itself is not
trained; it has to follow from keys and queries the attention learns.
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
  m.attention = "dense"             # set per pattern by benchmarks/passkey.py
  m.window = 896
  m.block_size = 64
  m.top_k = 12
  m.local_blocks = 1
  m.sink_blocks = 1

  c.data.seq_len = 2048             # stage 2 training context (bytes)
  c.train.steps = 30                # stage 2 steps per pattern
  c.train.batch_size = 1
  c.train.lr = 1e-3
  c.train.warmup_steps = 5
  c.train.log_every = 10

  c.passkey = ml_collections.ConfigDict()
  c.passkey.patterns = "dense,topk,sliding"   # model.attention of each trained model
  c.passkey.digits = 5
  c.passkey.distinct_digits = True  # keys of 5 different digits
  c.passkey.key_offset = 48         # digit d at position i of the key is the byte
  c.passkey.key_stride = 0          #   key_offset + key_stride * i + d (48, 0: ASCII)
  c.passkey.min_len = 0             # > 0: rows packed with documents of min_len..len bytes
  c.passkey.lm_weight = 1.0         # loss weight of the haystack bytes
  c.passkey.train_questions = 1     # extra question-answer pairs after the needle (training)
  c.passkey.answer_weight = 50.0    # loss weight of each key byte to copy
  c.passkey.pretrain_steps = 700    # stage 1 (shared, dense) steps (0: none)
  c.passkey.pretrain_len = 256
  c.passkey.pretrain_batch = 8
  c.passkey.pretrain_lr = 3e-3
  c.passkey.probe_every = 100       # stage 1: held-out accuracy at pretrain_len every N steps
  c.passkey.eval_lens = "2048,4096"  # held-out context lengths (bytes)
  c.passkey.eval_examples = 24      # per length, depths spread evenly over [0, 1]
  c.passkey.eval_batch = 4
  return c


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
