"""Seeded synthetic tasks for training and evaluation: MQAR, passkey, counting, arithmetic.

Every task is a frozen dataclass with ``sample(rng, tokenizer=None) -> Example``.
Examples are token sequences in a tokenizer's ids (BOS first where it has
one; default the byte tokenizer, so any model with a vocabulary of at least
259 ids trains and evaluates on them), and the text is readable. Tasks that
are text (passkey, counting, arithmetic) encode each piece of text (prompt,
answer) separately through the tokenizer, so answers start on a token
boundary; MQAR is defined over byte tokens and needs the byte tokenizer
(:func:`require_bytes`). Example ``i`` of a task under seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``: random access, so the same example comes
back in any order, from any process, and a Grain source is a thin wrapper.

An :class:`Example` is what a model is trained or scored on, in the trainer's
batch layout::

    inputs     [T] int32   tokens fed to the model
    targets    [T] int32   the token to predict at each position
    loss_mask  [T] float32 1 where the target is part of the answer

Language-modelling examples (all tasks here except running counting) are
one sequence ``x`` with ``inputs = x[:-1]``, ``targets = x[1:]``; their
``prompt`` (tokens before the first answer token) and ``answer`` give the
(prompt, answer) pair for generation. Running counting labels every input
position (a sequence-labelling target, as state-tracking papers train it).

Tasks:

* :class:`MQAR` - multi-query associative recall (Arora et al. 2023,
  "Zoology"): key-value pairs, then the keys again in random order; each
  query's value is an answer. ``seq_len`` pads with noise between the pairs
  and the queries, as Zoology spreads its queries over the sequence.
* :class:`Passkey` - a number hidden at a relative ``depth`` of ``context_len``
  tokens of filler text or of a byte corpus (Mohtashami & Jaggi 2023,
  "Landmark Attention").
* :class:`Counting` - count the 1s of a bit string modulo ``modulus``
  (``modulus=2`` is parity), the answer at the end or (``running``) after
  every bit.
* :class:`Arithmetic` - n-digit addition ``$a+b=c$``, with the sum's digits
  reversed when ``reverse`` (Lee et al. 2023, "Teaching Arithmetic to Small
  Transformers": least significant digit first is easier to learn).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import string
from typing import Iterator, Sequence

import numpy as np

from gemkit.tokenizer import PAD, ByteTokenizer, Tokenizer, resolve


@dataclasses.dataclass(frozen=True)
class Example:
  """One training / scoring row (see the module docstring); ``info`` holds the answers."""

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  info: dict
  lm: bool = True     # targets are the inputs shifted by one (a generation task)

  @classmethod
  def from_text(cls, pieces: Sequence[tuple[str, bool]], info: dict,
                tokenizer: Tokenizer | None = None) -> "Example":
    """Joins ``(text, is_answer)`` pieces, each encoded alone, after a BOS (if the
    tokenizer has one); answer tokens get loss."""
    tok = resolve(tokenizer)
    head = tok.encode("", bos=True)
    ids, answer = [head], [np.zeros(head.size, bool)]
    for text, is_answer in pieces:
      piece = tok.encode(text)
      ids.append(piece)
      answer.append(np.full(piece.size, is_answer))
    seq, ans = np.concatenate(ids), np.concatenate(answer)
    return cls(seq[:-1], seq[1:], ans[1:].astype(np.float32), info)

  def __len__(self) -> int:
    return int(self.inputs.size)

  @property
  def prompt(self) -> np.ndarray:
    """Tokens before the first answer token (BOS first)."""
    self._need_lm()
    first = int(np.argmax(self.loss_mask > 0))
    return self.inputs[:first + 1]

  @property
  def answer(self) -> np.ndarray:
    """The first contiguous answer span."""
    self._need_lm()
    mask = self.loss_mask > 0
    first = int(np.argmax(mask))
    end = first + (int(np.argmin(mask[first:])) if not mask[first:].all() else mask[first:].size)
    return self.targets[first:end]

  @property
  def sequence(self) -> np.ndarray:
    """Inputs and the last target: the whole sequence of a language-modelling example."""
    return np.append(self.inputs, self.targets[-1])

  def text(self, tokenizer: Tokenizer | None = None) -> str:
    return resolve(tokenizer).decode(self.sequence)

  def _need_lm(self):
    if not self.lm:
      raise ValueError("a sequence-labelling example has no (prompt, answer) pair")


def require_bytes(tokenizer: Tokenizer, task: str) -> None:
  """A ValueError unless ``tokenizer`` is the byte tokenizer, for a task defined on byte ids."""
  if not isinstance(tokenizer, ByteTokenizer):
    raise ValueError(f"{task} is defined on byte tokens and needs the byte tokenizer, not "
                     f"{tokenizer.name!r}")


def _single_token_ids(tokenizer: Tokenizer, chars: str, task: str) -> np.ndarray:
  """The id of each character of ``chars``, each of which must be one token."""
  ids = [tokenizer.encode(c) for c in chars]
  if any(i.size != 1 for i in ids):
    raise ValueError(f"{task} needs each of {chars!r} to be a single token; the "
                     f"{tokenizer.name!r} tokenizer splits one")
  return np.concatenate(ids)


def _distinct_strings(rng: np.random.Generator, alphabet: str, length: int, n: int) -> list[str]:
  space = len(alphabet) ** length
  if n > space:
    raise ValueError(f"cannot draw {n} distinct strings of length {length} "
                     f"over {len(alphabet)} symbols")
  codes = rng.choice(space, size=n, replace=False)
  out = []
  for c in codes:
    chars = []
    for _ in range(length):
      c, r = divmod(int(c), len(alphabet))
      chars.append(alphabet[r])
    out.append("".join(chars))
  return out


@dataclasses.dataclass(frozen=True)
class MQAR:
  """``"ab:3 cd:7 ... ~~~~ |cd:7 ab:3"``; answers are the values after the queries.

  Keys and values are byte tokens (the per-token recall Zoology measures), so
  the task needs the byte tokenizer.

  Args:
    num_pairs: key-value pairs (all distinct keys).
    seq_len: length of the inputs (tokens after BOS, excluding the last);
      noise fills the gap before the queries. ``None``: no noise.
    num_queries: keys queried (default all), each once, in random order.
    key_len, value_len: characters per key (lowercase) and value (digits).
  """

  num_pairs: int = 8
  seq_len: int | None = None
  num_queries: int | None = None
  key_len: int = 2
  value_len: int = 1
  name = "mqar"

  def setting(self) -> dict:
    return {"num_pairs": self.num_pairs, "seq_len": self.seq_len}

  def sample(self, rng: np.random.Generator, tokenizer: Tokenizer | None = None) -> Example:
    require_bytes(resolve(tokenizer), self.name)
    n, q = self.num_pairs, self.num_queries or self.num_pairs
    if not 1 <= q <= n:
      raise ValueError(f"num_queries must be in [1, num_pairs={n}], got {q}")
    keys = _distinct_strings(rng, string.ascii_lowercase, self.key_len, n)
    values = ["".join(rng.choice(list(string.digits), self.value_len)) for _ in range(n)]
    order = rng.permutation(n)[:q]
    context = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    queries = [(("" if j == 0 else " ") + keys[i] + ":", False) for j, i in enumerate(order)]
    queries = [p for pair in zip(queries, [(values[i], True) for i in order]) for p in pair]
    length = len(context) + 2 + sum(len(t) for t, _ in queries)   # inputs: BOS + text - 1
    gap = 0 if self.seq_len is None else self.seq_len - length
    if gap < 0:
      raise ValueError(f"seq_len={self.seq_len} is too short for {n} pairs "
                       f"(needs >= {length})")
    noise = (" " + "".join(rng.choice(list("~^*#"), gap)))[:gap]
    pieces = [(context + noise + " |", False)] + queries
    return Example.from_text(pieces, {"pairs": dict(zip(keys, values)),
                                      "queries": [keys[i] for i in order],
                                      "answers": [values[i] for i in order]})


FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")


@dataclasses.dataclass(frozen=True)
class Passkey:
  """A key of ``digits`` symbols at relative ``depth`` of a haystack, asked for at the end.

  The layout of Mohtashami & Jaggi (2023), ``M`` standing for ``mark``::

      head  haystack[:a]  "The pass key is MK. Remember it. MK is the pass key."
            haystack[a:]  "What is the pass key? The pass key is M"  | "K."

  The haystack is one of:

  * filler (``corpus`` None): whole sentences of ``filler`` after the paper's
    head, the needle one more sentence; ``a`` counts sentences. The inputs
    are at most ``context_len`` tokens (within one filler sentence of it),
    counted as the tokenizer encodes each part alone: exact for bytes, an
    upper bound for tokenizers that merge across the joins.
  * a random span of ``corpus``, byte-tokenizer ids (an id >= 256, a
    document break, becomes a newline and a byte >= 128 becomes "?"), with
    no head and the needle and each question on lines of their own; ``a``
    counts bytes, the inputs are exactly ``context_len`` bytes and each
    character is one byte (Latin-1). Needs the byte tokenizer.

  ``depth`` None draws ``a`` uniformly. ``questions`` more question-answer
  pairs go at uniformly random places after the needle (in training rows,
  more copies to learn). Symbol i of the key is ``chr(key_offset +
  key_stride * i + d)`` for a digit d, the first d nonzero (default: a
  decimal number), all d different if ``distinct_digits``.
  ``info["keys_at"]`` holds the positions in the sequence (BOS first) of the
  needle's two copies of the key and of each answer, counted as the
  tokenizer encodes each part alone: exact for bytes, and for the answers
  (pieces of their own) with any tokenizer.
  """

  context_len: int = 512
  depth: float | None = 0.5
  digits: int = 5
  filler: str = FILLER
  corpus: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
  questions: int = 0
  mark: str = ""
  key_offset: int = ord("0")
  key_stride: int = 0
  distinct_digits: bool = False
  name = "passkey"

  _HEAD = ("There is important info hidden inside a lot of irrelevant text. "
           "Find it and memorize it. ")

  def setting(self) -> dict:
    return {"context_len": self.context_len, "depth": self.depth}

  def sample(self, rng: np.random.Generator, tokenizer: Tokenizer | None = None) -> Example:
    tok = resolve(tokenizer)
    if self.depth is not None and not 0.0 <= self.depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1], got {self.depth}")
    if self.corpus is None:
      head, before, after, encode = self._HEAD, "", " ", lambda text: text
    else:
      require_bytes(tok, "passkey with a corpus haystack")
      head, before, after, encode = "", "\n", "\n", lambda text: text.encode("latin-1")
    size = lambda text: tok.encode(encode(text)).size
    key, m = self._key(rng), self.mark
    needle = [f"{before}The pass key is {m}", key, f". Remember it. {m}", key,
              f" is the pass key.{after}"]
    question = f"{before}What is the pass key? The pass key is {m}"
    fixed = (size(head) + size("".join(needle))
             + (self.questions + 1) * (size(question) + size(key + ".")))
    budget = self.context_len - fixed     # inputs = BOS + prompt + answers - 1 token
    if budget < 0:
      raise ValueError(f"context_len={self.context_len} is too short (needs >= {fixed})")
    hay = self._haystack(rng, budget, size)
    n = len(hay)
    at = int(rng.integers(0, n + 1)) if self.depth is None else int(round(self.depth * n))
    cuts = [at] + sorted(rng.integers(at, n + 1, self.questions).tolist()) + [n]
    parts = [(head + "".join(hay[:at]) + needle[0], False)] + [(t, False) for t in needle[1:]]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      parts += [("".join(hay[lo:hi]) + question, False), (key + ".", True)]
    starts = tok.encode("", bos=True).size + np.cumsum([0] + [size(t) for t, _ in parts])
    keys_at = [int(starts[i]) for i, (_, answer) in enumerate(parts) if answer or i in (1, 3)]
    pieces = [(encode("".join(t for t, _ in group)), answer)       # the text between answers
              for answer, group in itertools.groupby(parts, key=lambda part: part[1])]
    return Example.from_text(pieces, {"passkey": key, "needle_at": at, "keys_at": keys_at}, tok)

  def _key(self, rng: np.random.Generator) -> str:
    if self.distinct_digits:
      if not 1 <= self.digits <= 10:
        raise ValueError(f"digits must be in 1..10 for distinct digits, got {self.digits}")
      first = int(rng.integers(1, 10))
      rest = rng.permutation([d for d in range(10) if d != first])
      ds = [first] + rest[:self.digits - 1].tolist()
    else:
      ds = [int(c) for c in str(rng.integers(10 ** (self.digits - 1), 10 ** self.digits))]
    return "".join(chr(self.key_offset + self.key_stride * i + d) for i, d in enumerate(ds))

  def _haystack(self, rng: np.random.Generator, budget: int, size) -> Sequence[str]:
    """The haystack's units in ``budget`` tokens: filler sentences, or a corpus span's bytes."""
    if self.corpus is not None:
      start = int(rng.integers(0, self.corpus.size - budget + 1))
      span = self.corpus[start:start + budget]
      span = np.where(span >= 256, ord("\n"), np.where(span >= 128, ord("?"), span))
      return bytes(span.astype(np.uint8)).decode("ascii")
    sentences = [s.strip() + " " for s in re.findall(r"[^.]+\.", self.filler) if s.strip()]
    if not sentences:
      raise ValueError(f"filler needs at least one sentence ending in '.', got {self.filler!r}")
    cost = {s: size(s) for s in sentences}
    hay, i = [], 0
    while budget >= cost[sentences[i % len(sentences)]]:
      hay.append(sentences[i % len(sentences)])
      budget -= cost[hay[-1]]
      i += 1
    return hay


@dataclasses.dataclass(frozen=True)
class Counting:
  """Bits ``b_1..b_n``; the answer is ``sum(b) mod modulus`` (parity: modulus 2).

  ``running=False``: ``"0110=2"`` with the answer digit after ``"="``.
  ``running=True``: a labelling task, target ``i`` is ``sum(b_1..b_i) mod k``
  (inputs are BOS and the bits; the BOS position is not scored). Each bit
  and count is the token of its digit, so the tokenizer must have a single
  token for each digit.
  """

  length: int = 16
  modulus: int = 2
  running: bool = False

  @property
  def name(self) -> str:
    return "parity" if self.modulus == 2 else f"mod{self.modulus}"

  def setting(self) -> dict:
    return {"length": self.length, "modulus": self.modulus}

  def sample(self, rng: np.random.Generator, tokenizer: Tokenizer | None = None) -> Example:
    tok = resolve(tokenizer)
    if not 2 <= self.modulus <= 10:
      raise ValueError(f"modulus must be in [2, 10], got {self.modulus}")
    bits = rng.integers(0, 2, self.length)
    counts = np.cumsum(bits) % self.modulus
    text = "".join(map(str, bits))
    info = {"bits": text, "answer": str(counts[-1])}
    if not self.running:
      return Example.from_text([(text + "=", False), (str(counts[-1]), True)], info, tok)
    digit = _single_token_ids(tok, string.digits, f"{self.name} with running=True")
    head = tok.encode("", bos=True)
    inputs = np.concatenate([head, digit[bits]]).astype(np.int32)
    targets = np.concatenate([np.full(head.size, tok.pad_id), digit[counts]]).astype(np.int32)
    mask = np.concatenate([np.zeros(head.size), np.ones(self.length)]).astype(np.float32)
    return Example(inputs, targets, mask, info, lm=False)


@dataclasses.dataclass(frozen=True)
class Arithmetic:
  """``$a+b=c$`` with operands of 1..``digits`` digits (length drawn uniformly).

  ``reverse``: ``c`` is written least significant digit first. The answer is
  ``c`` and the closing ``$``.
  """

  digits: int = 3
  reverse: bool = False
  min_digits: int = 1
  name = "arithmetic"

  def setting(self) -> dict:
    return {"digits": self.digits, "reverse": self.reverse}

  def _operand(self, rng):
    n = int(rng.integers(self.min_digits, self.digits + 1))
    return int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10 ** n))

  def sample(self, rng: np.random.Generator, tokenizer: Tokenizer | None = None) -> Example:
    if not 1 <= self.min_digits <= self.digits:
      raise ValueError(f"need 1 <= min_digits <= digits, got {self.min_digits}, {self.digits}")
    a, b = self._operand(rng), self._operand(rng)
    c = str(a + b)
    return Example.from_text([(f"${a}+{b}=", False), ((c[::-1] if self.reverse else c) + "$",
                                                      True)], {"a": a, "b": b, "sum": a + b},
                             tokenizer)


# --- drawing and batching ----------------------------------------------------


def example(task, seed: int, index: int, tokenizer: Tokenizer | None = None) -> Example:
  """Example ``index`` of ``task`` under ``seed`` (independent of any other index), in
  ``tokenizer``'s ids (default bytes)."""
  return task.sample(np.random.default_rng([seed, index]), tokenizer)


def examples(task, seed: int, n: int, start: int = 0,
             tokenizer: Tokenizer | None = None) -> list[Example]:
  return [example(task, seed, i, tokenizer) for i in range(start, start + n)]


def batch(rows: Sequence[Example], seq_len: int | None = None,
          pad_id: int = PAD) -> dict[str, np.ndarray]:
  """Right-pads examples to ``seq_len`` (default: the longest) as a trainer batch.

  Returns inputs/targets (``pad_id``: the tokenizer's PAD), segment_ids (1
  real, 0 padding) and loss_mask (0 on padding), each [len(rows), seq_len].
  """
  L = seq_len or max(len(r) for r in rows)
  if any(len(r) > L for r in rows):
    raise ValueError(f"an example of {max(len(r) for r in rows)} tokens exceeds seq_len={L}")
  out = {"inputs": np.full((len(rows), L), pad_id, np.int32),
         "targets": np.full((len(rows), L), pad_id, np.int32),
         "segment_ids": np.zeros((len(rows), L), np.int32),
         "loss_mask": np.zeros((len(rows), L), np.float32)}
  for i, r in enumerate(rows):
    n = len(r)
    out["inputs"][i, :n], out["targets"][i, :n] = r.inputs, r.targets
    out["segment_ids"][i, :n], out["loss_mask"][i, :n] = 1, r.loss_mask
  return out


class Source:
  """A Grain random-access source: record ``i`` is ``batch([example(task, seed, i)], seq_len)``.

  ``grain.MapDataset.source(Source(task, seed, seq_len)).batch(32)`` is an
  endless, reproducible training stream.
  """

  def __init__(self, task, seed: int, seq_len: int, size: int = 2 ** 31 - 1,
               tokenizer: Tokenizer | None = None):
    self.task, self.seed, self.seq_len, self.size = task, seed, seq_len, size
    self.tokenizer = resolve(tokenizer)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    row = batch([example(self.task, self.seed, int(i), self.tokenizer)], self.seq_len,
                self.tokenizer.pad_id)
    return {k: v[0] for k, v in row.items()}


def batches(task, seed: int, batch_size: int, seq_len: int,
            tokenizer: Tokenizer | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of ``task`` (examples 0, 1, 2, ... in order)."""
  tok, i = resolve(tokenizer), 0
  while True:
    yield batch(examples(task, seed, batch_size, i, tok), seq_len, tok.pad_id)
    i += batch_size
