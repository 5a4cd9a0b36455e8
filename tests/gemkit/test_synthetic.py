"""Synthetic tasks: deterministic per seed, answers checked by independent brute-force solvers."""

import re

import grain
import numpy as np
import pytest

from gemkit import data, synthetic

TOK = data.ByteTokenizer()

TASKS = [
    synthetic.MQAR(num_pairs=6), synthetic.MQAR(num_pairs=16, seq_len=200, key_len=1),
    synthetic.MQAR(num_pairs=5, num_queries=3, value_len=2),
    synthetic.Passkey(context_len=300, depth=0.0), synthetic.Passkey(context_len=700, depth=0.4),
    synthetic.Passkey(context_len=700, depth=1.0, digits=7),
    synthetic.Counting(length=13), synthetic.Counting(length=40, modulus=3),
    synthetic.Counting(length=9, modulus=5, running=True),
    synthetic.Arithmetic(digits=3), synthetic.Arithmetic(digits=6, reverse=True),
]


def _sequence(e):
  return np.append(e.inputs, e.targets[-1])


def _answer_text(e):
  return TOK.decode(e.targets[e.loss_mask > 0])


# --- brute-force solvers, written from the text alone ------------------------------


def solve_mqar(text):
  context, queries = text.split(" |")
  pairs = [tok.split(":") for tok in context.split(" ") if ":" in tok]
  answers = []
  for q in queries.split(" "):
    key = q.split(":")[0]
    for k, v in pairs:           # linear scan, first match
      if k == key:
        answers.append(v)
        break
  return answers


def solve_passkey(prompt):
  return re.search(r"The pass key is (\d+)\. Remember it\.", prompt).group(1)


def solve_counting(bits, modulus):
  count, running = 0, []
  for b in bits:
    count = (count + (b == "1")) % modulus
    running.append(count)
  return running


def school_addition(a, b):
  a, b = a[::-1], b[::-1]
  digits, carry = [], 0
  for i in range(max(len(a), len(b))):
    s = carry + (int(a[i]) if i < len(a) else 0) + (int(b[i]) if i < len(b) else 0)
    digits.append(str(s % 10))
    carry = s // 10
  if carry:
    digits.append(str(carry))
  return "".join(reversed(digits))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{type(t).__name__}-{t.setting()}")
def test_deterministic_per_seed_and_index(task):
  a = synthetic.examples(task, seed=3, n=4)
  b = [synthetic.example(task, 3, i) for i in (3, 2, 1, 0)][::-1]   # any order
  for x, y in zip(a, b):
    for field in ("inputs", "targets", "loss_mask"):
      np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
  other = synthetic.examples(task, seed=4, n=4)
  assert any(not np.array_equal(x.inputs, y.inputs) for x, y in zip(a, other))
  assert any(not np.array_equal(a[0].inputs, x.inputs) for x in a[1:])
  for e in a:
    assert e.inputs.dtype == np.int32 and e.inputs[0] == data.BOS
    assert e.loss_mask.sum() > 0
    if e.lm:   # next-token layout, and (prompt, answer) is the answer span
      np.testing.assert_array_equal(e.inputs[1:], e.targets[:-1])
      first = len(e.prompt)
      np.testing.assert_array_equal(_sequence(e)[first:first + len(e.answer)], e.answer)


def test_mqar_answers_match_brute_force():
  for task in TASKS[:3]:
    for e in synthetic.examples(task, 0, 20):
      text = TOK.decode(_sequence(e))
      values = solve_mqar(text)
      assert _answer_text(e) == "".join(values)
      assert len(values) == (task.num_queries or task.num_pairs)
      keys = [t.split(":")[0] for t in text.split(" |")[0].split(" ") if ":" in t]
      assert len(set(keys)) == task.num_pairs
      if task.seq_len:
        assert len(e) == task.seq_len


def test_passkey_answer_length_and_depth():
  for task in TASKS[3:6]:
    for e in synthetic.examples(task, 1, 10):
      prompt = TOK.decode(e.prompt)
      key = solve_passkey(prompt)
      assert len(key) == task.digits and TOK.decode(e.answer) == key + "."
      assert prompt.endswith("What is the pass key? The pass key is ")
      assert task.context_len - 40 < len(e) <= task.context_len
  fractions = []
  for depth in (0.0, 0.5, 1.0):
    prompt = TOK.decode(synthetic.example(synthetic.Passkey(1000, depth), 0, 0).prompt)
    fractions.append(prompt.index("The pass key is") / len(prompt))
  assert fractions[0] < 0.12 and 0.4 < fractions[1] < 0.6 and fractions[2] > 0.8


def test_passkey_questions_mark_and_key_positions():
  task = synthetic.Passkey(context_len=600, depth=None, questions=2, mark="#")
  for i in range(5):
    e = synthetic.example(task, 0, i)
    key, seq = e.info["passkey"], e.sequence
    assert len(e) <= 600 and len(e.info["keys_at"]) == 2 + 3   # the needle's two, 3 answers
    for k in e.info["keys_at"]:
      assert TOK.decode(seq[k - 1:k + len(key)]) == "#" + key
    assert TOK.decode(e.targets[e.loss_mask > 0]) == (key + ".") * 3


def test_counting_answers_match_brute_force():
  for task in TASKS[6:9]:
    for e in synthetic.examples(task, 2, 20):
      bits = e.info["bits"]
      assert len(bits) == task.length and set(bits) <= {"0", "1"}
      truth = solve_counting(bits, task.modulus)
      if task.running:
        assert not e.lm and TOK.decode(e.inputs) == bits
        assert _answer_text(e) == "".join(map(str, truth))
      else:
        assert TOK.decode(_sequence(e)) == f"{bits}={truth[-1]}"


def test_arithmetic_answers_match_schoolbook_addition():
  for task in TASKS[9:]:
    lengths = set()
    for e in synthetic.examples(task, 5, 50):
      m = re.fullmatch(r"\$(\d+)\+(\d+)=(\d+)\$", TOK.decode(_sequence(e)))
      a, b, c = m.groups()
      lengths |= {len(a), len(b)}
      assert max(len(a), len(b)) <= task.digits
      assert c == (school_addition(a, b)[::-1] if task.reverse else school_addition(a, b))
      assert _answer_text(e) == c + "$"
    assert lengths == set(range(1, task.digits + 1))   # every operand length appears


def test_batch_source_and_errors():
  task = synthetic.Arithmetic(digits=2)
  rows = synthetic.examples(task, 0, 3)
  b = synthetic.batch(rows, seq_len=16)
  assert b["inputs"].shape == (3, 16)
  for i, r in enumerate(rows):
    n = len(r)
    np.testing.assert_array_equal(b["inputs"][i, :n], r.inputs)
    assert (b["inputs"][i, n:] == data.PAD).all() and (b["segment_ids"][i, n:] == 0).all()
    assert (b["segment_ids"][i, :n] == 1).all() and b["loss_mask"][i, n:].sum() == 0
  ds = grain.MapDataset.source(synthetic.Source(task, 0, 16)).batch(3)
  np.testing.assert_array_equal(ds[0]["targets"], b["targets"])
  first = next(synthetic.batches(task, 0, 3, 16))
  np.testing.assert_array_equal(first["loss_mask"], b["loss_mask"])
  with pytest.raises(ValueError, match="seq_len=4"):
    synthetic.batch(rows, seq_len=4)
  with pytest.raises(ValueError, match="too short"):
    synthetic.example(synthetic.MQAR(num_pairs=8, seq_len=20), 0, 0)
  with pytest.raises(ValueError, match="context_len"):
    synthetic.example(synthetic.Passkey(context_len=50), 0, 0)
  with pytest.raises(ValueError, match="no .prompt, answer. pair"):
    synthetic.example(synthetic.Counting(running=True), 0, 0).prompt
