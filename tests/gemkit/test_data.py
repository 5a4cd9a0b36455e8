"""Tokenizer, corpora, packing and the Grain pipeline."""

import json

import numpy as np
import pytest

from gemkit import data
from gemkit.config import ConfigError
from tests.helpers import tiny_config


def test_tokenizer_round_trip_and_specials():
  tok = data.ByteTokenizer()
  text = "héllo\nwörld ✓"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == data.BOS and ids[-1] == data.EOS
  assert ids.max() <= data.EOS and tok.vocab_size == 259
  assert tok.decode(ids) == text
  assert tok.decode([0xff, 0x41]) == "\ufffdA"  # bad UTF-8 decodes with replacement


def test_stdlib_corpus_excludes_tests_and_splits_deterministically():
  docs = data.stdlib_documents()
  names = [d.name for d in docs]
  assert names == sorted(names) and len(names) > 300
  assert not any("/test/" in f"/{n}" or n.split("/")[-1].startswith("test_") for n in names)
  cfg = tiny_config()
  a, b = data.Corpus.from_config(cfg.data), data.Corpus.from_config(cfg.data)
  assert a.fingerprint == b.fingerprint
  np.testing.assert_array_equal(a.heldout.tokens, b.heldout.tokens)
  held = [d.name for d in docs if data.in_heldout(d.name, cfg.data.heldout_fraction)]
  assert 0 < len(held) < 0.15 * len(docs)
  assert a.train.num_bytes + a.heldout.num_bytes == sum(len(d.data) for d in docs)


def test_packed_windows_segments_and_loss_mask():
  docs = [data.Document("a", b"abc"), data.Document("b", b"defgh"), data.Document("c", b"ij")]
  stream = data.TokenStream.from_documents(docs)
  # stream: B a b c E B d e f g h E B i j E   (16 tokens)
  windows = data.PackedWindows(stream, seq_len=6)
  assert len(windows) == 2
  w = windows[0]
  np.testing.assert_array_equal(w["inputs"], [data.BOS, 97, 98, 99, data.EOS, data.BOS])
  np.testing.assert_array_equal(w["targets"], [97, 98, 99, data.EOS, data.BOS, 100])
  np.testing.assert_array_equal(w["segment_ids"], [1, 1, 1, 1, 1, 2])
  # The target BOS of document b is not predicted from document a.
  np.testing.assert_array_equal(w["loss_mask"], [1, 1, 1, 1, 0, 1])
  w1 = windows[1]  # starts mid-document b
  np.testing.assert_array_equal(w1["inputs"], [100, 101, 102, 103, 104, data.EOS])
  np.testing.assert_array_equal(w1["segment_ids"], [1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(w1["loss_mask"], [1, 1, 1, 1, 1, 0])


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_and_resumable(tmp_path):
  cfg = tiny_config(tmp_path)
  corpus = data.Corpus.from_config(cfg.data)
  make = lambda: iter(data.train_dataset(corpus, cfg.data, 4, seed=3))
  first = _batches(make(), 6)
  again = _batches(make(), 6)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  it = make()
  _batches(it, 2)
  state = it.get_state()
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  for x, y in zip(_batches(resumed, 4), first[2:]):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


def test_process_shards_are_disjoint_halves_of_the_global_batch(tmp_path):
  cfg = tiny_config(tmp_path)
  corpus = data.Corpus.from_config(cfg.data)
  shards = [next(iter(data.train_dataset(corpus, cfg.data, 8, 0, i, 2))) for i in range(2)]
  assert shards[0]["inputs"].shape == (4, cfg.data.seq_len)
  rows = {tuple(r) for s in shards for r in s["inputs"]}
  assert len(rows) == 8


def test_jsonl_source_and_its_errors(tmp_path):
  good = tmp_path / "good.jsonl"
  good.write_text('{"text": "one"}\n\n{"text": "two"}\n')
  docs = data.jsonl_documents([str(good)])
  assert [d.data for d in docs] == [b"one", b"two"]
  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"text": "one"}\n{"text": \n')
  with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
    data.jsonl_documents([str(bad_json)])
  bad_utf8 = tmp_path / "latin1.jsonl"
  bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ConfigError, match=r"latin1.jsonl:2: line is not valid UTF-8"):
    data.jsonl_documents([str(bad_utf8)])
  no_field = tmp_path / "nofield.jsonl"
  no_field.write_text('{"body": "x"}\n')
  with pytest.raises(ConfigError, match=r"nofield.jsonl:1: needs a string field 'text'"):
    data.jsonl_documents([str(no_field)])


def test_text_source_takes_non_utf8_bytes_as_is(tmp_path):
  p = tmp_path / "latin1.txt"
  p.write_bytes(b"caf\xe9 cr\xe8me")
  (doc,) = data.text_documents([str(p)])
  ids = data.TokenStream.from_documents([doc]).tokens
  assert 0xe9 in ids and 0xe8 in ids


def test_empty_and_missing_corpora_are_config_errors(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  cfg = tiny_config()
  cfg.data.source, cfg.data.path = "text", str(empty)
  with pytest.raises(ConfigError, match="data.path: the text corpus is empty"):
    data.Corpus.from_config(cfg.data)
  with pytest.raises(ConfigError, match="data.path: no such file"):
    data.text_documents([str(tmp_path / "missing.txt")])


def test_eval_batches_spread_over_the_heldout_stream_and_pad():
  docs = [data.Document(str(i), bytes([65 + i]) * 30) for i in range(10)]
  stream = data.TokenStream.from_documents(docs)          # 320 tokens -> 39 windows of 8
  every = list(data.eval_batches(stream, 8, 4, max_windows=1000))
  assert sum(int((b["loss_mask"].sum(1) > 0).sum()) for b in every) == 39
  assert every[-1]["loss_mask"][-1].sum() == 0            # padded row is masked out
  some = list(data.eval_batches(stream, 8, 4, max_windows=5))
  firsts = [int(r[0]) for b in some for r in b["inputs"] if r[0] != data.PAD]
  assert len(firsts) == 5 and firsts[-1] == int(stream.tokens[38 * 8])


def test_process_shards_concatenate_to_the_single_process_batch(tmp_path):
  cfg = tiny_config(tmp_path)
  corpus = data.Corpus.from_config(cfg.data)
  whole = _batches(iter(data.train_dataset(corpus, cfg.data, 8, 0)), 3)
  shards = [_batches(iter(data.train_dataset(corpus, cfg.data, 8, 0, i, 2)), 3) for i in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([shards[0][step]["inputs"], shards[1][step]["inputs"]]),
        whole[step]["inputs"])
