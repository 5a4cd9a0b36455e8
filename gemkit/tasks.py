"""Task files in the lm-evaluation-harness spirit: local JSONL, one request per line.

A task file holds one JSON object per line (blank lines are skipped), all of
one ``type``; the task's name is the file's stem. Fields:

``{"type": "loglikelihood", "context": str, "continuation": str}``
    The summed log-probability (nats) of the continuation given the context,
    and whether greedy decoding would produce it (every continuation token is
    the argmax). Metrics: ``loglikelihood`` (mean over examples) and
    ``greedy_acc``.

``{"type": "multiple_choice", "context": str, "choices": [str, ...], "gold": int}``
    Each choice is scored as a continuation of the context. ``acc``: the
    choice with the highest summed log-probability is ``choices[gold]``;
    ``acc_norm``: the same with each log-probability divided by the
    choice's length in UTF-8 bytes (lm-eval normalises by characters; bytes
    do not depend on the tokenizer, and with the byte tokenizer they are
    tokens).

``{"type": "generate_until", "context": str, "target": str,
   "until": [str, ...], "max_new_tokens": int}``
    Greedy generation from the context, cut at the first stop string
    (``until``, default ``["\\n"]``) or stop id of the tokenizer (EOS), after
    at most ``max_new_tokens`` (default: the evaluation config's).
    ``exact_match``: the generation equals ``target`` after stripping
    surrounding whitespace.

Every line may also carry an ``"id"`` (string or int). Context and
continuation are joined as given (put the separating space in the
continuation or choice, e.g. ``" True"``). ``gemkit.evaluate`` tokenizes
them with the run's tokenizer, each on its own (as lm-eval does), the
context with a leading BOS where the tokenizer has one, as training
documents are. Any other field, a missing or ill-typed field, empty choices
or a line that is not a JSON object is a :class:`TaskFileError` naming the
file and line.

This module is independent of the model: :func:`evaluate` takes the two
primitives it needs (a batched loglikelihood and a batched greedy
generation) as functions; ``gemkit.evaluate`` supplies them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

import numpy as np

from gemkit import data
from gemkit.config import ConfigError

TYPES = ("loglikelihood", "multiple_choice", "generate_until")
_REQUIRED = {
    "loglikelihood": {"context": str, "continuation": str},
    "multiple_choice": {"context": str, "choices": list, "gold": int},
    "generate_until": {"context": str, "target": str},
}
_OPTIONAL = {"generate_until": {"until": list, "max_new_tokens": int}}
_ANY = {"type": str, "id": (str, int)}

# (context, continuation) -> (summed log-prob, is_greedy), batched.
LoglikelihoodFn = Callable[[Sequence[tuple[str, str]]], list[tuple[float, bool]]]
# (contexts, stop strings per context, max new tokens per context) -> generations.
GenerateFn = Callable[[Sequence[str], Sequence[Sequence[str]], Sequence[int]], list[str]]


class TaskFileError(ConfigError):
  """A malformed task file; the message starts with ``file:line``."""

  def __init__(self, where: str, message: str):
    super().__init__("tasks", f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class TaskFile:
  name: str
  path: str
  type: str
  records: tuple[dict, ...]


def _check_record(record, where: str) -> None:
  if not isinstance(record, dict):
    raise TaskFileError(where, f"expected a JSON object, got {type(record).__name__}")
  kind = record.get("type")
  if kind not in TYPES:
    raise TaskFileError(where, f"field 'type' must be one of {TYPES}, got {kind!r}")
  allowed = {**_ANY, **_REQUIRED[kind], **_OPTIONAL.get(kind, {})}
  for key in record:
    if key not in allowed:
      raise TaskFileError(where, f"unknown field {key!r} for type {kind!r} "
                          f"(allowed: {sorted(allowed)})")
  for key in _REQUIRED[kind]:
    if key not in record:
      raise TaskFileError(where, f"missing field {key!r} (type {kind!r})")
  for key, value in record.items():
    if not isinstance(value, allowed[key]) or isinstance(value, bool):
      raise TaskFileError(where, f"field {key!r} has the wrong type "
                          f"({type(value).__name__})")
  if kind == "loglikelihood" and not record["continuation"]:
    raise TaskFileError(where, "field 'continuation' is empty")
  if kind == "multiple_choice":
    choices = record["choices"]
    if not choices:
      raise TaskFileError(where, "field 'choices' is empty")
    if not all(isinstance(c, str) and c for c in choices):
      raise TaskFileError(where, "field 'choices' must hold non-empty strings")
    if not 0 <= record["gold"] < len(choices):
      raise TaskFileError(where, f"field 'gold' = {record['gold']} is not an index into "
                          f"{len(choices)} choices")
  if kind == "generate_until":
    until = record.get("until", ["\n"])
    if not all(isinstance(s, str) and s for s in until):
      raise TaskFileError(where, "field 'until' must hold non-empty strings")
    if record.get("max_new_tokens", 1) < 1:
      raise TaskFileError(where, "field 'max_new_tokens' must be >= 1")


def load(path: str | pathlib.Path) -> TaskFile:
  """Reads and validates a task file; errors are :class:`TaskFileError` naming file:line."""
  path = pathlib.Path(path)
  records, kind, first = [], None, ""
  for where, record in data.jsonl_records(path, "tasks", TaskFileError):
    _check_record(record, where)
    if kind is None:
      kind, first = record["type"], where
    elif record["type"] != kind:
      raise TaskFileError(where, f"type {record['type']!r} differs from the file's "
                          f"type {kind!r} (line {first.rsplit(':', 1)[1]})")
    records.append(record)
  if not records:
    raise TaskFileError(f"{path}:1", "the task file has no records")
  return TaskFile(path.stem, str(path), kind, tuple(records))


def choice_metrics(logprobs: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]],
                   gold: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (acc, acc_norm) in {0, 1}.

  acc_i = [argmax_c lp_ic == gold_i];  acc_norm_i = [argmax_c lp_ic / len_ic == gold_i]
  (ties go to the first choice).
  """
  acc = [int(np.argmax(lp)) == g for lp, g in zip(logprobs, gold)]
  norm = [int(np.argmax(np.asarray(lp) / np.asarray(n))) == g
          for lp, n, g in zip(logprobs, lengths, gold)]
  return np.asarray(acc, np.float64), np.asarray(norm, np.float64)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """``text`` up to the first occurrence of any stop string."""
  cut = min([i for i in (text.find(s) for s in until) if i >= 0], default=len(text))
  return text[:cut]


def evaluate(task: TaskFile, loglikelihood: LoglikelihoodFn, generate: GenerateFn, *,
             max_examples: int | None = None,
             default_max_new_tokens: int = 32) -> tuple[dict[str, np.ndarray], list[dict]]:
  """Per-example metric arrays and per-example records of ``task``.

  Returns ({metric: [n] float64}, [{"id"/"index", prediction fields}]).
  """
  records = task.records[:max_examples] if max_examples else task.records
  ids = [r.get("id", i) for i, r in enumerate(records)]
  if task.type == "loglikelihood":
    scored = loglikelihood([(r["context"], r["continuation"]) for r in records])
    lp = np.array([s[0] for s in scored], np.float64)
    greedy = np.array([s[1] for s in scored], np.float64)
    return ({"loglikelihood": lp, "greedy_acc": greedy},
            [{"id": i, "loglikelihood": float(a), "is_greedy": bool(b)}
             for i, a, b in zip(ids, lp, greedy)])
  if task.type == "multiple_choice":
    flat = [(r["context"], c) for r in records for c in r["choices"]]
    scored = iter(loglikelihood(flat))
    logprobs = [[next(scored)[0] for _ in r["choices"]] for r in records]
    lengths = [[len(c.encode("utf-8")) for c in r["choices"]] for r in records]
    acc, acc_norm = choice_metrics(logprobs, lengths, [r["gold"] for r in records])
    return ({"acc": acc, "acc_norm": acc_norm},
            [{"id": i, "logprobs": lp, "gold": r["gold"]}
             for i, lp, r in zip(ids, logprobs, records)])
  until = [r.get("until", ["\n"]) for r in records]
  outs = generate([r["context"] for r in records], until,
                  [r.get("max_new_tokens", default_max_new_tokens) for r in records])
  outs = [cut_at_stop(o, u) for o, u in zip(outs, until)]
  em = np.array([o.strip() == r["target"].strip() for o, r in zip(outs, records)], np.float64)
  return ({"exact_match": em},
          [{"id": i, "generation": o, "target": r["target"]}
           for i, o, r in zip(ids, outs, records)])
