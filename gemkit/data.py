"""Data: corpora, packed windows and Grain pipelines, in any tokenizer's ids.

Tokens are the ids of a ``gemkit.tokenizer.Tokenizer``: by default the byte
tokenizer (bytes 0..255 plus ``PAD``, ``BOS`` and ``EOS``). A corpus is a
list of named documents (bytes). Each document becomes ``BOS + ids + EOS``
(no BOS for a tokenizer without one); the documents of a split are
concatenated into one stream, cut into windows of ``seq_len + 1`` tokens,
and each window carries segment ids (one per document piece) so attention
and the loss never cross a document boundary.

Non-UTF-8 text needs no special case for the byte tokenizer: it works on raw
bytes, so a text file is read as bytes and trained on as is (tokenizers of
text see invalid UTF-8 as U+FFFD). JSONL lines must be JSON (hence UTF-8); a
line that is not is a ConfigError naming the file and line.

The train split is a Grain ``MapDataset`` (shuffled per epoch, sharded by
process, batched); its iterator state is checkpointed with the model, so a
resumed run reads exactly the batches the uninterrupted run would have.

Fine-tuning data are (prompt, completion) examples (:class:`Completion`),
packed whole into rows with one segment per example and the loss on the
completion tokens only (:class:`PackedCompletions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sysconfig
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from gemkit.config import ConfigError
# PAD, BOS, EOS, NUM_TOKENS and ByteTokenizer stay importable from here (their first home).
from gemkit.tokenizer import (  # pylint: disable=unused-import
    BOS, EOS, NUM_TOKENS, PAD, ByteTokenizer, Tokenizer, resolve)


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  data: bytes


# --- corpora ---------------------------------------------------------------


def stdlib_documents() -> list[Document]:
  """The running Python's standard library sources, without tests.

  Excludes site-packages and every ``test``/``tests``/``idle_test`` directory
  and ``test_*.py`` file. Sorted by relative path, so the corpus depends only
  on the Python installation (its fingerprint is recorded with each run).
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  docs = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if rel.parts[0] in ("site-packages", "dist-packages"):
      continue
    if rel.name.startswith("test_") or any(
        p in ("test", "tests", "idle_test") for p in rel.parts[:-1]):
      continue
    docs.append(Document(rel.as_posix(), path.read_bytes()))
  return docs


def text_documents(paths: Sequence[str]) -> list[Document]:
  """One document per file, read as raw bytes (any encoding trains as is)."""
  docs = []
  for p in paths:
    path = pathlib.Path(p)
    if not path.is_file():
      raise ConfigError("data.path", f"no such file: {p!r}")
    docs.append(Document(path.as_posix(), path.read_bytes()))
  return docs


def jsonl_records(path: str | pathlib.Path, key: str = "data.path",
                  error: Callable[[str, str], Exception] | None = None
                  ) -> Iterator[tuple[str, Any]]:
  """(``file:line``, record) of every non-blank line of a JSONL file.

  A missing file is a ConfigError for config key ``key``; a line that is not
  UTF-8 JSON raises ``error(where, message)`` (default: a ConfigError for
  ``key`` whose message starts with ``file:line``).
  """
  error = error or (lambda where, message: ConfigError(key, f"{where}: {message}"))
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(key, f"no such file: {str(path)!r}")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        yield where, json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        raise error(where, "line is not valid UTF-8") from None
      except json.JSONDecodeError as e:
        raise error(where, f"invalid JSON ({e.msg} at column {e.colno})") from None


def jsonl_documents(paths: Sequence[str], field: str = "text") -> list[Document]:
  """One document per JSONL line ``{field: str}``; errors name file and line."""
  docs = []
  for p in paths:
    for where, record in jsonl_records(p):
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ConfigError("data.jsonl_field", f"{where}: needs a string field {field!r}")
      docs.append(Document(where, record[field].encode("utf-8")))
  return docs


def load_documents(data_cfg) -> list[Document]:
  """The documents named by a ``config.data`` block."""
  paths = [p for p in data_cfg.path.split(",") if p]
  if data_cfg.source == "stdlib":
    docs = stdlib_documents()
  elif data_cfg.source == "text":
    docs = text_documents(paths)
  elif data_cfg.source == "jsonl":
    docs = jsonl_documents(paths, data_cfg.jsonl_field)
  else:
    raise ConfigError("data.source", f"unknown source {data_cfg.source!r}")
  docs = [d for d in docs if d.data]
  if not docs:
    raise ConfigError("data.path", f"the {data_cfg.source} corpus is empty")
  return docs


def in_heldout(key: str | bytes, fraction: float) -> bool:
  """Whether the document (or example) ``key`` falls in the held-out split.

  A hash of the key, so the split is stable across runs, orders and processes.
  """
  key = key.encode() if isinstance(key, str) else key
  h = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
  return h / 2**64 < fraction


# --- token streams and packed windows --------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """Concatenated ``BOS doc EOS`` sequences and where each document starts."""

  tokens: np.ndarray   # [N] uint16 (uint32 for vocabularies of more than 65535 ids)
  starts: np.ndarray   # [num_docs] int64, offsets of each document's first token
  num_bytes: int       # bytes of text in the documents
  pad_id: int = PAD    # the tokenizer's PAD (fills eval_batches' padding rows)

  @classmethod
  def from_documents(cls, docs: Sequence[Document],
                     tokenizer: Tokenizer | None = None) -> "TokenStream":
    """The documents in ``tokenizer``'s ids (default bytes), each ``BOS ids EOS``."""
    tok = resolve(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    head = np.asarray([] if tok.bos_id is None else [tok.bos_id], dtype)
    tail = np.asarray([tok.eos_id], dtype)
    pieces, starts, offset = [], [], 0
    for chunk in range(0, len(docs), _ENCODE_CHUNK):
      for body in tok.encode_batch([d.data for d in docs[chunk:chunk + _ENCODE_CHUNK]]):
        pieces += [head, body.astype(dtype), tail]
        starts.append(offset)
        offset += head.size + body.size + 1
    return cls(np.concatenate(pieces), np.asarray(starts, np.int64),
               sum(len(d.data) for d in docs), tok.pad_id)

  def segment_of(self, index: np.ndarray) -> np.ndarray:
    """Document number of each token position."""
    return np.searchsorted(self.starts, index, side="right") - 1


_ENCODE_CHUNK = 256    # documents per encode_batch call (bounds a text tokenizer's memory)


class PackedWindows:
  """Grain random-access source: window ``i`` covers tokens [i*L, i*L + L].

  Each record is a dict of [L] arrays:
    inputs:      tokens t .. t+L-1
    targets:     tokens t+1 .. t+L
    segment_ids: 1, 2, ... per document piece in the window (0 = padding)
    loss_mask:   1.0 where the target is in the same document as the input
  """

  def __init__(self, stream: TokenStream, seq_len: int):
    if stream.tokens.size < seq_len + 1:
      raise ConfigError("data.seq_len",
                        f"{seq_len} is longer than the whole split "
                        f"({stream.tokens.size} tokens)")
    self.stream, self.seq_len = stream, seq_len
    self._len = (stream.tokens.size - 1) // seq_len

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    L = self.seq_len
    idx = np.arange(int(i) * L, int(i) * L + L + 1)
    window = self.stream.tokens[idx].astype(np.int32)
    doc = self.stream.segment_of(idx)
    seg = (doc - doc[0] + 1).astype(np.int32)
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "segment_ids": seg[:-1],
        "loss_mask": (seg[1:] == seg[:-1]).astype(np.float32),
    }


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The train and held-out streams of a config, and their fingerprint."""

  train: TokenStream
  heldout: TokenStream
  fingerprint: str
  num_docs: tuple[int, int]

  @classmethod
  def from_config(cls, data_cfg, tokenizer: Tokenizer | None = None) -> "Corpus":
    """The corpus of a ``config.data`` block in ``tokenizer``'s ids (default bytes).

    The fingerprint hashes each document's name and contents, the held-out
    fraction and the tokenizer's fingerprint ("" for bytes).
    """
    tok = resolve(tokenizer)
    docs = load_documents(data_cfg)
    digest = hashlib.sha256()
    for d in docs:
      digest.update(d.name.encode() + b"\0" + hashlib.sha256(d.data).digest())
    held = [d for d in docs if in_heldout(d.name, data_cfg.heldout_fraction)]
    train = [d for d in docs if not in_heldout(d.name, data_cfg.heldout_fraction)]
    if not held or not train:  # too few documents to split by name: split bytes
      joined = b"\n".join(d.data for d in docs)
      cut = int(len(joined) * (1 - data_cfg.heldout_fraction))
      train, held = [Document("train", joined[:cut])], [Document("heldout", joined[cut:])]
    digest.update(f"heldout={data_cfg.heldout_fraction}".encode())
    digest.update(tok.fingerprint.encode())
    return cls(TokenStream.from_documents(train, tok), TokenStream.from_documents(held, tok),
               digest.hexdigest()[:16], (len(train), len(held)))


# --- pipelines ---------------------------------------------------------------


def train_dataset(corpus: Corpus, data_cfg, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Shuffled (reshuffled every epoch), process-sharded, batched windows.

  ``batch_size`` is the global batch. Process i gets rows
  [i * b, (i + 1) * b) of every global batch, b = batch_size // process_count,
  so the global batch (rows in process order) is the same for any number of
  processes.
  """
  return shuffled_batches(PackedWindows(corpus.train, data_cfg.seq_len), batch_size, seed,
                          process_index, process_count, data_cfg.prefetch)


def shuffled_batches(source, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1, prefetch: int = 2) -> grain.IterDataset:
  """Any random-access ``source`` of records as :func:`train_dataset` batches its windows."""
  if batch_size % process_count:
    raise ConfigError("train.batch_size",
                      f"{batch_size} is not divisible by {process_count} processes")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int,
                 max_windows: int) -> Iterator[dict[str, np.ndarray]]:
  """Disjoint held-out windows; the last batch is padded (mask 0).

  All windows if there are at most ``max_windows``, else ``max_windows`` of
  them evenly spaced over the stream (so a partial evaluation samples every
  part of the held-out split, not just its first documents).
  """
  windows = PackedWindows(stream, seq_len)
  if len(windows) <= max_windows:
    chosen = np.arange(len(windows))
  else:
    chosen = np.unique(np.linspace(0, len(windows) - 1, max_windows).round().astype(int))
  for start in range(0, len(chosen), batch_size):
    rows = [windows[i] for i in chosen[start:start + batch_size]]
    yield _stack_padded(rows, batch_size, stream.pad_id)


def _stack_padded(rows: list[dict], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows stacked into a batch, filled up with padding rows (inputs ``pad_id``, the rest 0)."""
  fill = {k: np.zeros_like(v) if k != "inputs" else np.full_like(v, pad_id)
          for k, v in rows[0].items()}
  rows = rows + [fill] * (batch_size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# --- prompt / completion examples (fine-tuning) --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completion:
  """A fine-tuning example: ``prompt`` ids (BOS first, if the tokenizer has one) and
  ``completion`` ids (EOS last)."""

  prompt: np.ndarray
  completion: np.ndarray

  @classmethod
  def from_text(cls, prompt: str, completion: str,
                tokenizer: Tokenizer | None = None) -> "Completion":
    tok = resolve(tokenizer)
    return cls(tok.encode(prompt, bos=True), tok.encode(completion, eos=True))

  @property
  def positions(self) -> int:
    """Input positions the example takes in a row: prompt + completion - 1."""
    return self.prompt.size + self.completion.size - 1


class PackedCompletions:
  """Grain random-access source: examples packed whole, in order, into rows of ``seq_len``.

  An example ``x = prompt + completion`` occupies ``len(x) - 1`` positions
  (inputs ``x[:-1]``, targets ``x[1:]``); a row takes examples while they fit
  (first fit in order) and is right-padded. Each record is a dict of [L] arrays:
    inputs, targets: ``pad_id`` (the tokenizer's PAD) on padding
    segment_ids:     1, 2, ... per example (0 = padding): attention stays inside one
    loss_mask:       1.0 only where the target is a completion token (EOS included)
  """

  def __init__(self, examples: Sequence[Completion], seq_len: int, pad_id: int = PAD):
    self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
    rows, row, used = [], [], 0
    for i, ex in enumerate(self.examples):
      if ex.prompt.size < 1 or ex.completion.size < 1:
        raise ConfigError("data", f"example {i} needs a non-empty prompt and completion")
      if ex.positions > seq_len:
        raise ConfigError("data.seq_len", f"example {i} takes {ex.positions} positions, "
                          f"more than seq_len={seq_len}")
      if used + ex.positions > seq_len:
        rows.append(row)
        row, used = [], 0
      row.append(i)
      used += ex.positions
    if row:
      rows.append(row)
    self.rows = rows

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    L = self.seq_len
    out = {"inputs": np.full(L, self.pad_id, np.int32),
           "targets": np.full(L, self.pad_id, np.int32),
           "segment_ids": np.zeros(L, np.int32), "loss_mask": np.zeros(L, np.float32)}
    at = 0
    for segment, j in enumerate(self.rows[int(i)], 1):
      ex = self.examples[j]
      seq = np.concatenate([ex.prompt, ex.completion]).astype(np.int32)
      n = seq.size - 1
      out["inputs"][at:at + n], out["targets"][at:at + n] = seq[:-1], seq[1:]
      out["segment_ids"][at:at + n] = segment
      out["loss_mask"][at + ex.prompt.size - 1:at + n] = 1.0   # targets seq[len(prompt):]
      at += n
    return out

  def batches(self, batch_size: int, max_rows: int | None = None
              ) -> Iterator[dict[str, np.ndarray]]:
    """The first ``max_rows`` rows (default all) in order; the last batch padded (mask 0)."""
    n = len(self) if max_rows is None else min(max_rows, len(self))
    for start in range(0, n, batch_size):
      yield _stack_padded([self[i] for i in range(start, min(start + batch_size, n))],
                          batch_size, self.pad_id)
