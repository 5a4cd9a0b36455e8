"""gemkit.tokenizer against transformers: tokenizers built here (nothing is downloaded).

A byte-level BPE and a SentencePiece-style (Metaspace, byte fallback) BPE are
trained on a few multilingual sentences; their ids must be
``transformers.AutoTokenizer``'s, and everything that turns text into ids
(corpora, completions, synthetic tasks, sampling, bits per byte) must work in
them.
"""

import hashlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import models
from gemkit import data, evaluate, sample, synthetic, train
from gemkit.studies import finetune
from gemkit import tokenizer as tokenizer_lib
from gemkit.config import ConfigError
from tests.helpers import tiny_config

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TRAIN_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Über Größe: straße, Äpfel.",
               "机器学习很有趣。", "مرحبا بالعالم", "emoji 🚀✨ and\ttabs\nnew lines",
               "def f(x):\n    return x * 2  # code"]
SAMPLES = TRAIN_TEXTS + [
    "Grüße aus München — naïve café, façade.", "深度学习模型的训练需要大量数据。",
    "النص العربي يُكتب من اليمين إلى اليسار", "🤖👍🏽 family: 👨‍👩‍👧 flags 🇩🇪",
    "class A:\n\tdef g(self):\n\t\treturn {'k': [1, 2]}\r\n", "double  spaces, trailing  "]
SPECIALS = ["<s>", "</s>", "<|end|>"]


def _write(directory: pathlib.Path, tok, config: dict, generation: dict | None = None):
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
  if generation is not None:
    (directory / "generation_config.json").write_text(json.dumps(generation))
  return directory


def _byte_level_bpe():
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TRAIN_TEXTS * 4, trainer)
  return tok


def _sentencepiece_bpe():
  """Llama-2 style: Metaspace pre-tokenizer (prefix "▁"), byte fallback <0xAB> tokens."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
  tok.decoder = tokenizers.decoders.Sequence([
      tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(),
      tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS,
                                           limit_alphabet=60)
  tok.train_from_iterator(TRAIN_TEXTS * 4, trainer)
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  for b in range(256):
    vocab.setdefault(f"<0x{b:02X}>", len(vocab))
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _added(content):
  """A special token in tokenizer_config.json's dict form (as transformers writes it)."""
  return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
          "rstrip": False, "single_word": False, "special": True}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  bpe = _byte_level_bpe()
  end = bpe.token_to_id("<|end|>")
  return {
      "bpe": _write(root / "bpe", bpe, {"bos_token": "<s>", "eos_token": "</s>"},
                    {"eos_token_id": [bpe.token_to_id("</s>"), end]}),
      "sp": _write(root / "sp", _sentencepiece_bpe(),
                   {"bos_token": _added("<s>"), "eos_token": _added("</s>")}),
  }


@pytest.fixture(scope="module")
def hf(dirs):
  return tokenizer_lib.HFTokenizer.from_dir(dirs["bpe"])


def _auto_ids(directory, text):
  auto = transformers.AutoTokenizer.from_pretrained(directory)
  return auto(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_ids_match_auto_tokenizer_and_decode_round_trips(dirs, kind):
  tok = tokenizer_lib.HFTokenizer.from_dir(dirs[kind])
  auto = transformers.AutoTokenizer.from_pretrained(dirs[kind])
  for text in SAMPLES:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == auto(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text   # specials dropped
  assert [x.tolist() for x in tok.encode_batch(SAMPLES)] == [tok.encode(t).tolist()
                                                             for t in SAMPLES]


def test_bos_eos_pad_and_stop_ids(dirs, hf, tmp_path):
  s, end = hf._tok.token_to_id("<s>"), hf._tok.token_to_id("<|end|>")
  eos = hf._tok.token_to_id("</s>")
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (s, eos, eos)          # PAD falls back to EOS
  assert hf.stop_ids == (eos, end) and hf.vocab_size == 300
  ids = hf.encode("hi", bos=True, eos=True)
  assert ids[0] == s and ids[-1] == eos and ids[1:-1].tolist() == _auto_ids(dirs["bpe"], "hi")
  assert "stop" in hf.describe() and str(end) in hf.describe()
  assert hf.encode("a<s>b").tolist() == _auto_ids(dirs["bpe"], "a<s>b") and s in hf.encode("a<s>b")

  def variant(name, config, generation=None):
    return tokenizer_lib.HFTokenizer.from_dir(_write(tmp_path / name, hf._tok, config,
                                                     generation))

  only_generation = variant("gen", {}, {"bos_token_id": s, "eos_token_id": [end, eos],
                                        "pad_token_id": 0})
  assert (only_generation.bos_id, only_generation.eos_id, only_generation.pad_id) == (s, end, 0)
  assert only_generation.stop_ids == (end, eos)
  no_bos = variant("no_bos", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
                              "pad_token": _added("<|end|>")})
  assert no_bos.bos_id is None and no_bos.pad_id == end
  assert no_bos.encode("hi", bos=True).tolist() == _auto_ids(dirs["bpe"], "hi")
  with pytest.raises(ConfigError, match="names no EOS"):
    variant("no_eos", {"bos_token": "<s>"})
  with pytest.raises(ConfigError, match="'<missing>' is not a token") as e:
    variant("bad", {"eos_token": "<missing>"})
  assert "\n" not in str(e.value) and "tokenizer_config.json" in str(e.value)


@pytest.mark.parametrize("kind, prefix", [("bpe", 0), ("sp", 1)])
def test_token_bytes_sum_to_the_utf8_length(dirs, kind, prefix):
  """Byte-level BPE: exact; SentencePiece style: plus the "▁" the tokenizer prepends."""
  tok = tokenizer_lib.HFTokenizer.from_dir(dirs[kind])
  table = tok.token_bytes()
  assert table.shape == (tok.vocab_size,) and table.dtype == np.int32
  assert all(table[tok._tok.token_to_id(t)] == 0 for t in SPECIALS)
  for text in SAMPLES:
    ids = tok.encode(text, bos=True, eos=True)
    assert table[ids].sum() == len(text.encode("utf-8")) + prefix, text
  if kind == "sp":
    assert table[tok._tok.token_to_id("<0xF0>")] == 1


def test_byte_tokenizer_save_gives_its_ids_in_transformers(tmp_path):
  byte = tokenizer_lib.ByteTokenizer()
  out = byte.save(tmp_path / "bytes")
  auto = transformers.AutoTokenizer.from_pretrained(out)
  from_json = tokenizer_lib.HFTokenizer.from_dir(out)
  for text in SAMPLES + ["<pad><s></s> specials as text", "\x00\x7f\u00ff\U0010ffff"]:
    ids = byte.encode(text).tolist()
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    assert auto(text)["input_ids"] == [data.BOS] + ids           # transformers puts BOS first
    assert from_json.encode(text).tolist() == ids
    assert from_json.decode(byte.encode(text, bos=True, eos=True)) == text
  assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (256, 257, 258)
  assert (from_json.pad_id, from_json.bos_id, from_json.eos_id) == (256, 257, 258)
  np.testing.assert_array_equal(from_json.token_bytes(), byte.token_bytes())
  assert isinstance(tokenizer_lib.load(out), tokenizer_lib.ByteTokenizer)


def test_save_load_and_for_run_round_trip(hf, tmp_path):
  assert isinstance(tokenizer_lib.for_run(tmp_path / "old_run"), tokenizer_lib.ByteTokenizer)
  saved = tokenizer_lib.save_for_run(hf, tmp_path / "run")
  assert saved == tmp_path / "run" / "tokenizer" and (saved / "generation_config.json").is_file()
  back = tokenizer_lib.for_run(tmp_path / "run")
  assert isinstance(back, tokenizer_lib.HFTokenizer) and back.fingerprint == hf.fingerprint
  assert (back.bos_id, back.eos_id, back.pad_id, back.stop_ids) == (
      hf.bos_id, hf.eos_id, hf.pad_id, hf.stop_ids)
  assert back.encode(SAMPLES[-2]).tolist() == hf.encode(SAMPLES[-2]).tolist()
  tokenizer_lib.save_for_run(tokenizer_lib.ByteTokenizer(), tmp_path / "byte_run")
  assert isinstance(tokenizer_lib.for_run(tmp_path / "byte_run"), tokenizer_lib.ByteTokenizer)


def test_missing_tokenizer_is_one_line_naming_the_directory(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for call in (tokenizer_lib.HFTokenizer.from_dir, tokenizer_lib.load):
    with pytest.raises(ConfigError) as e:
      call(empty)
    message = str(e.value)
    assert e.value.key == "tokenizer" and "\n" not in message
    assert str(empty) in message and "tokenizer.json" in message
  (empty / "tokenizer.model").write_bytes(b"sentencepiece")
  with pytest.raises(ConfigError, match="save_pretrained") as e:
    tokenizer_lib.HFTokenizer.from_dir(empty)
  assert "\n" not in str(e.value)


# --- everything that turns text into ids ------------------------------------------------


def _data_cfg(path, fraction=0.1):
  return ml_collections.ConfigDict({"source": "text", "path": str(path), "jsonl_field": "text",
                                    "heldout_fraction": fraction})


def test_corpus_windows_decode_to_the_file_text(hf, tmp_path):
  text = "\n".join(SAMPLES) * 3 + "\n" + "plain ascii tail. " * 40   # the cut falls in it
  path = tmp_path / "corpus.txt"
  path.write_text(text, encoding="utf-8")
  corpus = data.Corpus.from_config(_data_cfg(path), hf)
  assert corpus.num_docs == (1, 1) and corpus.train.tokens.dtype == np.uint16
  assert corpus.train.tokens[0] == hf.bos_id and corpus.train.tokens[-1] == hf.eos_id
  assert hf.decode(corpus.train.tokens) + hf.decode(corpus.heldout.tokens) == text
  assert corpus.train.num_bytes + corpus.heldout.num_bytes == len(text.encode())
  windows = data.PackedWindows(corpus.train, 16)
  ids = np.concatenate([windows[i]["inputs"] for i in range(len(windows))])
  assert text.startswith(hf.decode(ids)) and len(hf.decode(ids)) > len(text) // 2
  batch = next(data.eval_batches(corpus.heldout, 16, 64, 1000))
  assert (batch["inputs"][-1] == hf.pad_id).all() and batch["loss_mask"][-1].sum() == 0

  byte_corpus = data.Corpus.from_config(_data_cfg(path))
  assert byte_corpus.fingerprint != corpus.fingerprint
  digest = hashlib.sha256()                 # byte corpora keep their recorded fingerprints
  digest.update(path.as_posix().encode() + b"\0" + hashlib.sha256(text.encode()).digest())
  digest.update(b"heldout=0.1")
  assert byte_corpus.fingerprint == digest.hexdigest()[:16]


def test_streams_of_large_vocabularies_are_uint32():
  class Wide(tokenizer_lib.ByteTokenizer):
    vocab_size, pad_id, bos_id, eos_id = 70_000, 69_997, 69_998, 69_999

    def encode_batch(self, texts):
      return [ids + 65_536 for ids in super().encode_batch(texts)]

  stream = data.TokenStream.from_documents([data.Document("a", b"ab")], Wide())
  assert stream.tokens.dtype == np.uint32
  assert stream.tokens.tolist() == [69_998, 65_536 + 97, 65_536 + 98, 69_999]
  assert stream.pad_id == 69_997 and stream.num_bytes == 2


def test_packed_completions_in_hf_ids(hf):
  pairs = [("Frage: 2+2? ", "vier 🚀"), ("翻译:", " 机器学习"), ("x", "y\n")]
  examples = [data.Completion.from_text(p, c, hf) for p, c in pairs]
  assert all(ex.prompt[0] == hf.bos_id and ex.completion[-1] == hf.eos_id for ex in examples)
  rows = data.PackedCompletions(examples, 96, hf.pad_id)
  assert len(rows) == 1
  row = rows[0]
  for segment, (prompt, completion) in enumerate(pairs, 1):
    inside = row["segment_ids"] == segment
    assert hf.decode(row["inputs"][inside]) == prompt + completion
    assert hf.decode(row["targets"][inside & (row["loss_mask"] > 0)]) == completion
  assert (row["inputs"][row["segment_ids"] == 0] == hf.pad_id).all()
  batch = next(rows.batches(4))
  assert (batch["inputs"][len(rows):] == hf.pad_id).all()


def test_synthetic_text_tasks_encode_through_the_tokenizer(hf):
  e = synthetic.example(synthetic.Arithmetic(digits=4), 0, 1, hf)
  assert e.inputs[0] == hf.bos_id
  assert hf.decode(e.answer) == f"{e.info['sum']}$"
  assert e.text(hf) == f"${e.info['a']}+{e.info['b']}={e.info['sum']}$"
  p = synthetic.example(synthetic.Passkey(context_len=400), 0, 0, hf)
  assert len(p) <= 400 and hf.decode(p.answer) == p.info["passkey"] + "."
  c = synthetic.example(synthetic.Counting(length=9, modulus=3, running=True), 0, 0, hf)
  assert hf.decode(c.inputs) == c.info["bits"] and hf.decode(c.targets)[-1] == c.info["answer"]
  batch = synthetic.batch([e, p], pad_id=hf.pad_id)
  assert (batch["inputs"][0, len(e):] == hf.pad_id).all()
  with pytest.raises(ValueError, match="mqar .*byte tokenizer"):
    synthetic.example(synthetic.MQAR(num_pairs=4), 0, 0, hf)
  with pytest.raises(ConfigError, match="mqar .*byte tokenizer"):
    evaluate.suite("mqar", evaluate.default_config().mqar, hf)


class Scripted(nnx.Module):
  """A model whose greedy decoding emits ``script`` one id per step, whatever the prompt."""

  def __init__(self, script, vocab_size):
    self.logits = nnx.Variable(10.0 * jax.nn.one_hot(jnp.asarray(script), vocab_size))

  def init_cache(self, batch, length):
    return jnp.zeros((batch,), jnp.int32)

  def decode(self, tokens, cache, num_valid=None):
    table = self.logits[...]
    step = table[jnp.minimum(cache, table.shape[0] - 1)]
    return jnp.broadcast_to(step[:, None], tokens.shape + step.shape[-1:]), cache + 1


@pytest.mark.parametrize("stop", ["</s>", "<|end|>"])
def test_generate_stops_at_any_stop_id(hf, stop):
  script = np.concatenate([hf.encode("Grüße 🚀"), [hf._tok.token_to_id(stop)],
                           hf.encode(" never")])
  model = Scripted(script, hf.vocab_size)
  assert sample.generate(model, ["Hallo"], max_new_tokens=12, tokenizer=hf) == ["Grüße 🚀"]
  ids = sample.generate_ids(model, [hf.encode("Hallo", bos=True)], max_new_tokens=12,
                            eos_ids=hf.stop_ids, pad_id=hf.pad_id)[0]
  n = len(hf.encode("Grüße 🚀"))
  assert ids[:n + 1].tolist() == script[:n + 1].tolist() and (ids[n + 1:] == hf.pad_id).all()


def test_finetune_examples_and_exact_match_in_hf_ids(hf, tmp_path):
  path = tmp_path / "task.jsonl"
  path.write_text(json.dumps({"prompt": "Übersetze: cat ->", "completion": " Katze 🐈"}) + "\n")
  (example,) = finetune.jsonl_examples(str(path), tokenizer=hf)
  assert hf.decode(example.completion) == " Katze 🐈" and example.completion[-1] == hf.eos_id
  (sum_example,) = finetune.arithmetic_examples(synthetic.Arithmetic(digits=3), 0, 1,
                                                tokenizer=hf)
  assert sum_example.prompt[0] == hf.bos_id and sum_example.completion[-1] == hf.eos_id
  task = finetune.TaskData([example], [sum_example], 64, {}, pad_id=hf.pad_id)
  assert (next(task.eval_batches(2))["inputs"][1] == hf.pad_id).all()
  result = finetune.exact_match(Scripted(example.completion, hf.vocab_size), [example],
                                tokenizer=hf)
  assert result["exact_match"] == 1.0
  assert result["samples"][0]["generated"] == result["samples"][0]["expected"] == " Katze 🐈"


def test_bits_per_byte_counts_token_bytes(hf, tmp_path):
  """Held-out evaluation and the trainer's eval step divide by UTF-8 bytes, not ids < 256."""
  model = models.build(tiny_config().model, rngs=nnx.Rngs(0))
  text = "\n".join(SAMPLES)
  path = tmp_path / "heldout.txt"
  path.write_text(text, encoding="utf-8")
  cfg = evaluate.default_config().heldout
  cfg.path = str(path)
  docs, _, _ = evaluate.heldout_documents(None, cfg, tokenizer=hf)
  metrics, _, per_doc = evaluate.heldout_perplexity(model, docs, window=16, tokenizer=hf)
  assert metrics["bytes"] == len(text.encode()) == sum(per_doc["bytes"])

  stream = data.TokenStream.from_documents(
      [data.Document(str(i), t.encode()) for i, t in enumerate(SAMPLES)], hf)
  batch = next(data.eval_batches(stream, 16, 64, 64))
  graphdef, params, frozen = train.split_model(model)
  sums = train.eval_step(params, frozen, batch, hf.token_bytes(), graphdef=graphdef)
  mask = batch["loss_mask"] > 0
  targets = batch["targets"]
  assert float(sums["bytes"]) == hf.token_bytes()[targets[mask]].sum()
  logits = np.asarray(model(batch["inputs"], batch["segment_ids"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  text_targets = mask & (hf.token_bytes()[targets] > 0)
  assert math.isclose(float(sums["byte_nll"]), nll[text_targets].sum(), rel_tol=1e-4)
  assert (targets[mask] == hf.eos_id).any()          # EOS is a target, and not a byte
