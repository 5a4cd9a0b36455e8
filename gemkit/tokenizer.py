"""Tokenizers: one interface for the byte tokenizer and Hugging Face tokenizer.json files.

Everything in gemkit that turns text into ids (corpora, task files,
synthetic tasks, fine-tuning examples, sampling) takes a :class:`Tokenizer`;
``None`` there means :class:`ByteTokenizer`, the default of every run.

Definitions shared by both kinds:

* ``encode(text, bos=, eos=)``: the text's ids, with ``bos_id`` in front when
  ``bos`` is asked for *and* the tokenizer has one (``bos_id`` may be None,
  e.g. Qwen's), and ``eos_id`` at the end when ``eos`` is asked for.
  Documents are ``encode(text, bos=True, eos=True)``; prompts
  ``encode(text, bos=True)``.
* ``decode(ids)``: the text of ``ids`` with special ids (pad, BOS, the stop
  ids, a tokenizer.json's special added tokens) dropped.
* ``token_bytes()``: for each id, how many UTF-8 bytes of text it stands
  for, 0 for special tokens. Bits per byte is the NLL of the targets in bits
  over ``token_bytes[targets]`` summed, which for the byte tokenizer is the
  NLL of the byte targets (EOS excluded) over their count.
* ``stop_ids``: the ids that end a generation, ``eos_id`` first.

A run records its tokenizer in ``<workdir>/tokenizer/`` (:func:`save_for_run`,
:func:`for_run`); a run without one (every run from before tokenizers were
pluggable) is a byte run. :meth:`ByteTokenizer.save` writes a real
tokenizer.json, so a gemkit model exported with it works in transformers.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import pathlib
import re
from typing import Any, Sequence

import numpy as np
import tokenizers

from gemkit.config import ConfigError

PAD, BOS, EOS = 256, 257, 258
NUM_TOKENS = 259
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
MARKER = "gemkit_tokenizer"     # tokenizer_config.json key of a saved ByteTokenizer
RUN_DIR = "tokenizer"           # <workdir>/tokenizer/ holds a run's tokenizer


class Tokenizer(abc.ABC):
  """What gemkit needs of a tokenizer (the module docstring defines each part).

  Attributes:
    name: a short name for reports.
    vocab_size: ids are 0 .. vocab_size - 1.
    pad_id: fills padding (never scored).
    bos_id: starts documents and prompts; None when the tokenizer has no BOS.
    eos_id: ends documents and fine-tuning completions.
    stop_ids: the ids that end a generation (``eos_id`` first).
    fingerprint: what fixes the ids of a text, hashed into corpus
      fingerprints; "" for the byte tokenizer, so byte corpora keep the
      fingerprints they were recorded with.
  """

  name: str
  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int
  stop_ids: tuple[int, ...]
  fingerprint: str

  def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """int32 ids of ``text``, BOS first if asked (and there is one), EOS last if asked."""
    return self._with_specials(self.encode_batch([text])[0], bos=bos, eos=eos)

  def _with_specials(self, ids: np.ndarray, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    head = [self.bos_id] if bos and self.bos_id is not None else []
    tail = [self.eos_id] if eos else []
    return np.concatenate([np.asarray(head, np.int32), np.asarray(ids, np.int32),
                           np.asarray(tail, np.int32)])

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    """int32 ids of each text, without specials (bytes are UTF-8 text)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of ``ids``; special ids are dropped."""

  @abc.abstractmethod
  def token_bytes(self) -> np.ndarray:
    """[vocab_size] int32: the UTF-8 bytes each id stands for (0: special)."""

  @abc.abstractmethod
  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes files from which :func:`load` rebuilds this tokenizer; returns the directory."""

  def describe(self) -> str:
    stops = f" (stop {list(self.stop_ids)})" if len(self.stop_ids) > 1 else ""
    return (f"{self.name}: vocab {self.vocab_size}, bos {self.bos_id}, eos {self.eos_id}"
            f"{stops}, pad {self.pad_id}")


# --- bytes ---------------------------------------------------------------------------------


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, plus PAD=256, BOS=257, EOS=258."""

  name = "bytes"
  vocab_size = NUM_TOKENS
  pad_id, bos_id, eos_id = PAD, BOS, EOS
  stop_ids = (EOS,)
  fingerprint = ""
  SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")    # the names of PAD, BOS, EOS in tokenizer.json

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8") if isinstance(t, str) else bytes(t),
                          np.uint8).astype(np.int32) for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Bytes back to text; special ids are dropped, bad UTF-8 is replaced."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    return (np.arange(NUM_TOKENS) < 256).astype(np.int32)

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    """tokenizer.json (byte-level BPE without merges: byte b is id b), and configs.

    ``transformers.AutoTokenizer`` gives this tokenizer's ids on any text:
    ``split_special_tokens`` makes a literal "<s>" in text bytes, as here.
    With ``add_special_tokens`` (its default) it puts BOS first, as gemkit
    does for documents and prompts.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    pad, bos, eos = self.SPECIAL_TOKENS
    _write_json(directory / "tokenizer_config.json", {
        MARKER: "bytes", "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
        "eos_token": eos, "pad_token": pad, "split_special_tokens": True})
    _write_json(directory / "generation_config.json",
                {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    return directory


def _byte_level_tokenizer():
  """The ByteTokenizer as a ``tokenizers.Tokenizer``."""
  char = bytes_to_unicode()
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={char[b]: b for b in range(256)},
                                                   merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True)
                          for t in ByteTokenizer.SPECIAL_TOKENS])
  bos = ByteTokenizer.SPECIAL_TOKENS[1]
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS)])
  return tok


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> character table of byte-level BPE vocabularies: printable
  Latin-1 bytes are themselves, the other 68 bytes are chr(256 + i)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  moved = [b for b in range(256) if b not in keep]
  table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}
  return table


# --- Hugging Face tokenizer.json ---------------------------------------------------------------


class HFTokenizer(Tokenizer):
  """A tokenizer.json through the ``tokenizers`` library (:meth:`from_dir`).

  ``encode`` gives the ids of ``transformers.AutoTokenizer.from_pretrained(dir)(
  text, add_special_tokens=False)`` (the tokenizer.json's post-processor,
  which may insert BOS, is not applied: BOS and EOS come from the flags).
  """

  def __init__(self, tokenizer, files: dict[str, bytes], name: str, *, bos_id: int | None,
               eos_id: int, pad_id: int, stop_ids: Sequence[int]):
    self._tok, self._files, self.name = tokenizer, dict(files), name
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.stop_ids = tuple(stop_ids)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    specials |= {pad_id, eos_id, *self.stop_ids} | ({bos_id} if bos_id is not None else set())
    self._specials = np.asarray(sorted(specials), np.int64)
    specials_json = json.dumps([bos_id, eos_id, pad_id, self.stop_ids,
                                tokenizer.encode_special_tokens]).encode()
    self.fingerprint = hashlib.sha256(files["tokenizer.json"] + specials_json).hexdigest()[:16]
    self._token_bytes: np.ndarray | None = None

  @classmethod
  def from_dir(cls, path: str | pathlib.Path) -> "HFTokenizer":
    """The tokenizer of a directory with a tokenizer.json.

    Special ids: each of BOS, EOS and PAD is the ``bos_token`` /
    ``eos_token`` / ``pad_token`` of tokenizer_config.json (a string or a
    ``{"content": ...}`` dict) if it names one, else generation_config.json's
    ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (the first, where
    ``eos_token_id`` is a list). ``stop_ids`` are EOS and every
    ``eos_token_id`` of generation_config.json. ``add_bos_token: false``
    (the tokenizer never puts a BOS first) makes ``bos_id`` None; PAD falls
    back to EOS. ``add_eos_token`` needs nothing: gemkit puts EOS where it
    belongs (end of documents and completions) itself. ``split_special_tokens:
    true`` encodes special-token strings in text as text, as transformers does.
    """
    path = pathlib.Path(path)
    if not (path / "tokenizer.json").is_file():
      raise ConfigError("tokenizer", _missing_tokenizer(path))
    files = {n: (path / n).read_bytes() for n in HF_FILES if (path / n).is_file()}
    try:
      tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError("tokenizer", f"{path / 'tokenizer.json'}: not a tokenizer.json the "
                        f"tokenizers library reads ({str(e).splitlines()[0]})") from None
    config = _read_json(path / "tokenizer_config.json")
    tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
    ids = _special_ids(tok, config, _read_json(path / "generation_config.json"), path)
    return cls(tok, files, path.name or str(path), **ids)

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    """Ids without the post-processor's specials; bytes are decoded as UTF-8
    (invalid sequences become U+FFFD)."""
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._specials)]
    return self._tok.decode(ids.tolist(), skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    """Bytes per id, by the vocabulary's kind (read from tokenizer.json):

    * byte-level BPE (a ByteLevel pre-tokenizer or decoder: GPT-2, Llama 3,
      Qwen): each character of the token is one byte (GPT-2's byte table).
    * SentencePiece style (a Metaspace or ByteFallback step, or "▁" in the
      decoder: Llama 2, Gemma): "▁" is one space, ``<0xAB>`` is one byte,
      other characters their UTF-8 bytes. A prefix space the tokenizer adds
      counts as a byte of the text.
    * anything else: the UTF-8 bytes of the token string.

    Special added tokens are 0; other added tokens are their text's UTF-8 bytes.
    """
    if self._token_bytes is None:
      count = _byte_counter(json.loads(self._files["tokenizer.json"]))
      added = self._tok.get_added_tokens_decoder()
      out = np.zeros(self.vocab_size, np.int32)
      for token, i in self._tok.get_vocab(with_added_tokens=True).items():
        if i in added:
          out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        else:
          out[i] = count(token)
      out[self._specials] = 0
      out.flags.writeable = False
      self._token_bytes = out
    return self._token_bytes

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes the tokenizer.json, tokenizer_config.json and generation_config.json it was
    read from (those the source directory had)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in self._files.items():
      (directory / name).write_bytes(content)
    return directory


def _missing_tokenizer(path: pathlib.Path) -> str:
  message = f"{path} has no tokenizer.json, which gemkit needs to encode text"
  if any(path.glob("*.model")):
    message += (" (it has only a SentencePiece *.model: save it with transformers' fast "
                "tokenizer, AutoTokenizer.from_pretrained(dir).save_pretrained(dir), to get "
                "tokenizer.json)")
  return message


def _special_ids(tok, config: dict, generation: dict, path: pathlib.Path) -> dict[str, Any]:
  """bos_id, eos_id, pad_id and stop_ids as :meth:`HFTokenizer.from_dir` resolves them."""

  def named(key: str) -> int | None:      # tokenizer_config.json's <key>: a token string
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    if value is None:
      return None
    i = tok.token_to_id(value)
    if i is None:
      raise ConfigError("tokenizer", f"{path / 'tokenizer_config.json'}: {key} {value!r} is "
                        "not a token of tokenizer.json")
    return i

  def listed(key: str) -> list[int]:      # generation_config.json's <key>: an id or a list
    value = generation.get(key)
    return [] if value is None else [value] if isinstance(value, int) else list(value)

  def first(*candidates):
    return next((c for c in candidates if c is not None), None)

  eos_ids = listed("eos_token_id")
  eos = first(named("eos_token"), *eos_ids)
  if eos is None:
    raise ConfigError("tokenizer", f"{path} names no EOS: set eos_token in "
                      "tokenizer_config.json or eos_token_id in generation_config.json")
  bos = first(named("bos_token"), *listed("bos_token_id"))
  return {"bos_id": None if config.get("add_bos_token") is False else bos, "eos_id": eos,
          "pad_id": first(named("pad_token"), *listed("pad_token_id"), eos),
          "stop_ids": list(dict.fromkeys([eos, *eos_ids]))}


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_counter(spec: dict):
  """token string -> bytes of text, for the vocabulary kind of a tokenizer.json's ``spec``."""
  decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
  types = set(re.findall(r'"type": "(\w+)"', json.dumps(spec.get("pre_tokenizer")) + decoder))
  if "ByteLevel" in types:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return lambda token: sum(1 if c in byte_of else len(c.encode("utf-8")) for c in token)
  if types & {"Metaspace", "ByteFallback"} or "▁" in decoder:
    return lambda token: 1 if _BYTE_TOKEN.fullmatch(token) else len(
        token.replace("▁", " ").encode("utf-8"))
  return lambda token: len(token.encode("utf-8"))


# --- files, loading, runs -------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict:
  """A JSON object file, {} when there is none; anything else is a ConfigError naming it."""
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError("tokenizer", f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ConfigError("tokenizer", f"{path}: expected a JSON object")
  return value


def _write_json(path: pathlib.Path, value: dict) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load(directory: str | pathlib.Path) -> Tokenizer:
  """The tokenizer saved in ``directory``: a ByteTokenizer where its
  tokenizer_config.json carries the ``gemkit_tokenizer: bytes`` marker of
  :meth:`ByteTokenizer.save`, else the directory's tokenizer.json."""
  directory = pathlib.Path(directory)
  if _read_json(directory / "tokenizer_config.json").get(MARKER) == "bytes":
    return ByteTokenizer()
  return HFTokenizer.from_dir(directory)


def save_for_run(tokenizer: Tokenizer, workdir: str | pathlib.Path) -> pathlib.Path:
  """Records ``tokenizer`` as the run's (``<workdir>/tokenizer/``); returns that directory."""
  return tokenizer.save(pathlib.Path(workdir) / RUN_DIR)


def for_run(workdir: str | pathlib.Path) -> Tokenizer:
  """The tokenizer a run recorded (:func:`save_for_run`), or the byte tokenizer for a
  run that recorded none."""
  directory = pathlib.Path(workdir) / RUN_DIR
  return load(directory) if directory.is_dir() else ByteTokenizer()


def resolve(tokenizer: Tokenizer | None) -> Tokenizer:
  """``tokenizer``, or the byte tokenizer for None (every ``tokenizer=None`` default)."""
  return ByteTokenizer() if tokenizer is None else tokenizer
