"""The passkey benchmark's task: synthetic.Passkey on a corpus span, training rows, scorer."""

import dataclasses
import types

import numpy as np
import pytest

from benchmarks import passkey as bench
from gemkit import config as config_lib
from gemkit import data as data_lib

# A haystack with document breaks (EOS, BOS) and no "$".
HAY = np.concatenate([np.frombuffer(b"x = 1\nprint(x)\n" * 40, np.uint8).astype(np.uint16),
                      np.array([data_lib.EOS, data_lib.BOS], np.uint16)] * 8)
MARK = "$"
QUESTION = "\nWhat is the pass key? The pass key is " + MARK


def _text(tokens) -> str:
  return bytes(int(t) for t in tokens if t < 256).decode("latin-1")


def _needle(key: str) -> str:
  return f"\nThe pass key is {MARK}{key}. Remember it. {MARK}{key} is the pass key.\n"


def _spec(**overrides):
  p = config_lib.load("experiments/passkey.py").passkey
  p.update(overrides)
  return p


def _example(hay, seed, length, p, depth=None, questions=0):
  """(sequence, the key starts benchmarks/passkey.py trains on, key)."""
  task = dataclasses.replace(bench.passkey_task(p, hay), context_len=length, depth=depth,
                             questions=questions)
  e = task.sample(np.random.default_rng(seed))
  return e.sequence, e.info["keys_at"][1:], e.info["passkey"]


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("questions", [0, 3])
def test_example_plants_the_key(depth, questions):
  doc, keys, key = _example(HAY, 1, 1000, _spec(), depth, questions=questions)
  assert doc.shape == (1001,) and doc[0] == data_lib.BOS
  assert (doc[1:] < 256).all()                     # document breaks became newlines
  assert len(key) == 5 and key[0] != "0" and len(set(key)) == 5
  text = _text(doc[1:])
  at = text.index(_needle(key))
  hay_len = 1000 - len(_needle(key)) - (questions + 1) * len(QUESTION + key + ".")
  assert at == round(depth * hay_len)              # the needle at its depth of the haystack
  assert text.count(MARK) == 2 + questions + 1
  assert text.endswith(QUESTION + key + ".")
  assert len(keys) == questions + 2 and keys == sorted(keys)
  assert keys[0] == 1 + at + _needle(key).rindex(MARK) + 1
  for k in keys:                                   # the key after each "$" but the first
    assert _text(doc[k:k + 5]) == key and _text(doc[k - 1:k]) == MARK
  for k in keys[1:]:                               # the answers
    assert _text(doc[k - len(QUESTION):k]) == QUESTION
  assert keys[-1] == 1001 - 6


def test_example_rejects_short_length():
  with pytest.raises(ValueError, match="context_len=100 is too short"):
    _example(HAY, 0, 100, _spec(), questions=1)


def test_corpus_needs_the_byte_tokenizer():
  with pytest.raises(ValueError, match="passkey with a corpus .* needs the byte tokenizer"):
    bench.passkey_task(_spec(), HAY).sample(np.random.default_rng(0),
                                            types.SimpleNamespace(name="bpe"))


def test_keys_with_repeats_allowed():
  p = _spec(distinct_digits=False, key_offset=48, key_stride=0)
  keys = [_example(HAY, seed, 400, p)[2] for seed in range(200)]
  assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)
  assert any(len(set(k)) < 5 for k in keys)


def test_keys_of_rare_bytes():
  p = _spec(key_offset=0, key_stride=0, distinct_digits=True)
  doc, keys, key = _example(HAY, 4, 400, p, 0.5)
  codes = [ord(c) for c in key]
  assert len(set(codes)) == 5 and all(1 <= c <= 9 for c in codes[:1]) and max(codes) <= 9
  for k in keys:
    np.testing.assert_array_equal(doc[k:k + 5], codes)
  assert np.isin(doc, codes).sum() == 5 * len(keys) + 5   # + the needle's first copy


def test_positional_keys_use_one_alphabet_per_digit():
  # The default: digit i of the key is byte 128 + 10 i + d; the haystack's bytes >= 128
  # become "?".
  p = _spec()
  assert (p.key_offset, p.key_stride, p.distinct_digits) == (128, 10, False)
  hay = np.concatenate([HAY, np.array([0xC3, 0xA9, 200], np.uint16)])
  for seed in range(20):
    doc, keys, key = _example(hay, seed, 400, p, 0.5)
    digits = [ord(c) - 128 - 10 * i for i, c in enumerate(key)]
    assert all(0 <= d <= 9 for d in digits) and digits[0] != 0
    for k in keys:
      np.testing.assert_array_equal(doc[k:k + 5], [ord(c) for c in key])
    assert ((doc >= 128) & (doc < 256)).sum() == 5 * (len(keys) + 1)   # key symbols only
    assert _text(doc).count(_needle(key)) == 1


@pytest.mark.parametrize("min_len,questions", [(0, 3), (120, 0)])
def test_train_batch_weights_answers(min_len, questions):
  p = _spec(min_len=min_len, train_questions=questions)
  b = bench.train_batch(bench.passkey_task(p, HAY), np.random.default_rng(2), 3, 512, p)
  assert {k: v.shape for k, v in b.items()} == {k: (3, 512) for k in b}
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  for row in range(3):
    inputs, targets, seg, w = (b[k][row] for k in ("inputs", "targets", "segment_ids",
                                                    "loss_mask"))
    assert inputs[0] == data_lib.BOS and seg[0] == 1 and (np.diff(seg) >= 0).all()
    assert (seg[inputs == data_lib.BOS] == np.unique(seg)).all()   # one BOS per segment
    answer = w == p.answer_weight
    # Each document: its second needle key and (train_questions + 1) answers.
    assert answer.sum() == seg.max() * (p.train_questions + 2) * p.digits
    first = np.flatnonzero(answer & ~np.roll(answer, 1))
    assert (inputs[first] == ord(MARK)).all()
    symbol = targets[answer].reshape(-1, p.digits) - p.key_offset - p.key_stride * np.arange(5)
    assert ((symbol >= 0) & (symbol <= 9)).all()
    assert set(np.unique(w)) <= {0.0, p.lm_weight, p.answer_weight}
    assert (w[targets == data_lib.BOS] == 0).all()    # no loss across documents
    if min_len:                                       # documents of >= min_len bytes
      assert (np.bincount(seg)[1:-1] >= min_len).all()
  assert b["segment_ids"].max() > 1 if min_len else b["segment_ids"].max() == 1


def test_pretrain_stages():
  assert bench.pretrain_stages("256x8x300, 1024x4x300") == [(256, 8, 300), (1024, 4, 300)]
  assert bench.pretrain_stages("") == []
  for bad in ("256x8", "256x0x10", "ax8x300"):
    with pytest.raises(ValueError, match="passkey.pretrain"):
      bench.pretrain_stages(bad)


def test_score_teacher_forced():
  docs = [_example(HAY, 3, 300, _spec(), d) for d in (0.2, 0.8)]
  tokens = np.stack([d for d, _, _ in docs])
  first = docs[0][1][-1]
  perfect = tokens[:, 1:]                          # the next token at every input position
  hits = bench.score(perfect, tokens, first, 5)
  assert hits.shape == (2, 5) and hits.all()
  wrong = perfect.copy()
  wrong[0, first] = ord("x")                       # predicts the second key digit of example 0
  wrong[1, first - 2] = ord("x")                   # before the key: not scored
  hits = bench.score(wrong, tokens, first, 5)
  np.testing.assert_array_equal(hits, [[1, 0, 1, 1, 1], [1] * 5])
