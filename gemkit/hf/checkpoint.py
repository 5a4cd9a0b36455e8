"""Hugging Face model directories: config.json and safetensors files, in and out.

Reading never unpickles: a directory with only ``pytorch_model.bin`` (or other
pickle files) is refused. Tensors are read one at a time through
``safetensors.safe_open`` (memory-mapped), and only the slices asked for, so
a process that holds a shard of a parameter reads that shard alone.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gemkit.config import ConfigError

PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
INDEX = "model.safetensors.index.json"


class HFError(ConfigError):
  """A Hugging Face directory that cannot be read; one line naming the file,
  tensor or key (a ConfigError, so launchers print it without a traceback)."""

  def __init__(self, where: str | pathlib.Path, message: str):
    ValueError.__init__(self, f"{where}: {message}")
    self.key = str(where)


def model_dir(path: str | pathlib.Path) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_dir():
    raise HFError(p, "not a directory (a Hugging Face model directory holds config.json and "
                  "safetensors files)")
  return p


def is_model_dir(path: str | pathlib.Path) -> bool:
  """Whether ``path`` looks like a Hugging Face model directory (has config.json)."""
  return (pathlib.Path(path) / "config.json").is_file()


def read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise HFError(path, "no such file") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise HFError(path, f"not valid JSON ({e})") from None


def read_config(path: str | pathlib.Path) -> dict:
  """The ``config.json`` of a model directory."""
  p = model_dir(path) / "config.json"
  if not p.is_file():
    raise HFError(p, "no such file: a Hugging Face model directory needs config.json")
  return read_json(p)


def weight_files(path: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """tensor name -> safetensors file, from the index or the files themselves."""
  d = model_dir(path)
  if (d / INDEX).is_file():
    index = read_json(d / INDEX)
    if "weight_map" not in index:
      raise HFError(d / INDEX, "has no weight_map")
    files = {name: d / f for name, f in index["weight_map"].items()}
    for f in set(files.values()):
      if not f.is_file():
        raise HFError(f, f"listed in {INDEX} but missing")
    return files
  found = sorted(d.glob("*.safetensors"))
  if not found:
    pickles = sorted(p.name for pattern in PICKLES for p in d.glob(pattern))
    if pickles:
      raise HFError(d, f"holds only pickle weights ({', '.join(pickles)}); gemkit never "
                    "unpickles: convert them to safetensors, e.g. "
                    "model.save_pretrained(dir, safe_serialization=True) in transformers")
    raise HFError(d, "no model.safetensors (nor model.safetensors.index.json)")
  files = {}
  for f in found:
    with safe_open(f, framework="np") as handle:
      files.update({name: f for name in handle.keys()})
  return files


class TensorReader:
  """The safetensors files of a directory; ``read(name, index)`` reads one tensor,
  or the slice ``index`` of it, memory-mapped.

  A file is opened at its first read and closed by :meth:`done` once each
  of its tensors is done, so its mapped pages stop counting against the
  process: reading file by file, the resident file pages stay within one
  shard.
  """

  def __init__(self, path: str | pathlib.Path):
    self.files = weight_files(path)
    self._open: dict[pathlib.Path, Any] = {}
    self._left: dict[pathlib.Path, set[str]] = {}
    for name, f in self.files.items():
      self._left.setdefault(f, set()).add(name)

  def __enter__(self) -> "TensorReader":
    return self

  def __exit__(self, *exc) -> None:
    for handle in self._open.values():
      handle.__exit__(None, None, None)
    self._open.clear()

  def _handle(self, name: str):
    f = self.files[name]
    if f not in self._open:
      self._open[f] = safe_open(f, framework="np").__enter__()
    return self._open[f]

  def done(self, name: str) -> None:
    """Marks tensor ``name`` read; closes its file when nothing else is left in it."""
    f = self.files[name]
    self._left[f].discard(name)
    if not self._left[f] and f in self._open:
      self._open.pop(f).__exit__(None, None, None)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._handle(name).get_slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    part = self._handle(name).get_slice(name)
    return np.asarray(part[index] if index else part[:])


def _size(a: np.ndarray) -> int:
  return a.size * a.dtype.itemsize


def write_tensors(out_dir: pathlib.Path, tensors: Iterator[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 5 * 2**30) -> list[pathlib.Path]:
  """Writes (name, array) pairs as ``model.safetensors``, or as shards of at most
  ``max_shard_bytes`` with ``model.safetensors.index.json``; at most one shard
  is held in host memory."""
  names: list[list[str]] = []
  written, total, current, size = [], 0, {}, 0

  def flush(final: bool):
    nonlocal current, size
    if current or final:
      tmp = out_dir / f"shard-{len(written):05d}.tmp"
      save_file(current, str(tmp), metadata={"format": "pt"})
      written.append(tmp)
      names.append(list(current))
    current, size = {}, 0

  for name, a in tensors:
    if current and size + _size(a) > max_shard_bytes:
      flush(False)
    current[name] = np.ascontiguousarray(a)
    size += _size(a)
    total += _size(a)
  flush(True)
  if len(written) == 1:
    target = out_dir / "model.safetensors"
    written[0].rename(target)
    return [target]
  n = len(written)
  final, weight_map = [], {}
  for i, (tmp, shard_names) in enumerate(zip(written, names), 1):
    target = out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
    tmp.rename(target)
    final.append(target)
    weight_map.update({k: target.name for k in shard_names})
  (out_dir / INDEX).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  return final


def write_json(path: pathlib.Path, data: Mapping[str, Any]) -> None:
  path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
