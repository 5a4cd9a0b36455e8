"""Hugging Face checkpoints to gemkit models and back.

Import: ``config.json`` becomes a gemkit ``config.model`` block
(``architectures``), the model is built abstractly (``nnx.eval_shape``: no
parameter memory), and every parameter is read from the safetensors files,
one tensor at a time, straight into its final dtype and placement: with a
``mesh``, ``jax.make_array_from_callback`` asks each process only for the
slices of its own devices, so a process reads only what it holds. The host
holds one tensor (or one slice) at a time, never a second copy of the model.

Export: the inverse map, written with ``safetensors``; the architecture is
the first one that can express the model (an imported model goes back to
its own). LoRA / DoRA adapters are merged into a copy first.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import models
from models import layers, transformer
from gemkit import sharding as sharding_lib
from gemkit import tokenizer as tokenizer_lib
from gemkit.hf import architectures
from gemkit.surgery import lora
from gemkit.hf.checkpoint import (HFError, TensorReader, model_dir, read_config,
                                  write_json, write_tensors)

DTYPES = ("float32", "bfloat16", "float16")
# Stored tensors that carry no parameter (recomputed buffers of older exports).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _file_dtype(hf: Mapping[str, Any]) -> str:
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return dtype if dtype in DTYPES else "float32"


def model_config(path: str | pathlib.Path, *, dtype: str | None = None) -> dict:
  """The gemkit ``config.model`` block of a Hugging Face directory.

  ``dtype`` (default: the checkpoint's ``dtype`` / ``torch_dtype``) sets both
  the parameter and the compute dtype; ``init_from`` records the directory.
  """
  where = model_dir(path) / "config.json"
  hf = read_config(path)
  try:
    arch = architectures.of_config_json(hf, str(where))
    cfg = arch.to_config(hf)
  except KeyError as e:
    raise HFError(where, f"missing key {e.args[0]!r}") from None
  except ValueError as e:
    raise HFError(where, str(e).removeprefix(f"{where}: ")) from None
  dtype = dtype or _file_dtype(hf)
  if dtype not in DTYPES:
    raise HFError("dtype", f"must be one of {DTYPES}, got {dtype!r}")
  return cfg | {"dtype": dtype, "param_dtype": dtype, "init_from": str(path)}


# config.model keys a run sets for itself on top of an imported architecture.
RUN_KEYS = ("dtype", "param_dtype", "remat", "attention_impl", "scan_impl", "dropout_rate")


def resolve_model_config(model_cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The ``config.model`` of a run with ``init_from`` = a Hugging Face directory.

  The directory's architecture (:func:`model_config`), with the run's own
  ``RUN_KEYS`` (dtypes, remat, kernel impls, dropout), and, when the run asks
  for another attention pattern than ``dense``, its pattern keys (e.g.
  ``attention=topk``, ``top_k``, ``block_size``: sparse attention on a
  pretrained model; ``layer_pattern``'s sliding layers stay sliding).
  """
  imported = model_config(model_cfg["init_from"])
  out = dict(imported)
  for key in RUN_KEYS:
    if key in model_cfg and key in imported:
      out[key] = model_cfg[key]
  if model_cfg.get("attention", "dense") != "dense" and out["family"] == "transformer":
    out.update({k: model_cfg[k] for k in transformer.PATTERN_FIELDS if k in model_cfg})
  return ml_collections.ConfigDict(out)


def _get(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _paths(tree: Mapping, prefix: tuple = ()) -> list[tuple]:
  out = []
  for key, value in tree.items():
    out += _paths(value, prefix + (key,)) if isinstance(value, Mapping) else [prefix + (key,)]
  return out


def _reader_fn(reader: TensorReader, t: architectures.Tensor, shape: tuple, dtype, where):
  """index (slices in gemkit layout, or None) -> that block of the parameter."""
  stored = reader.shape(t.name)
  want = tuple(reversed(shape)) if t.transpose else tuple(shape)
  if t.to_gemkit is None and stored != want:
    raise HFError(where, f"tensor {t.name} has shape {list(stored)}, the config needs "
                  f"{list(want)}")

  def block(index):
    if t.to_gemkit is not None:
      a = t.to_gemkit(reader.read(t.name))
      if a.shape != tuple(shape):
        raise HFError(where, f"tensor {t.name} has shape {list(stored)}, which does not give "
                      f"the config's {list(shape)}")
      a = a[index] if index else a
    elif t.transpose:
      a = reader.read(t.name, tuple(reversed(index)) if index else None).T
    else:
      a = reader.read(t.name, index)
    if t.shift:
      a = a.astype(np.float32) - np.float32(t.shift)
    return np.asarray(a, dtype)

  return block


def _place(block, shape: tuple, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """The parameter on ``sharding``, from ``block(index)`` reads of its pieces:
  ``make_array_from_callback`` asks each process only for its own devices'
  pieces, and each distinct piece is read once, however many devices hold it."""
  pieces: dict[tuple, np.ndarray] = {}

  def piece(index):
    key = tuple((s.start, s.stop) for s in index)
    if key not in pieces:
      pieces[key] = block(index)
    return pieces[key]

  return jax.make_array_from_callback(shape, sharding, piece)


def load_weights(model_cfg: Mapping[str, Any], path: str | pathlib.Path, *,
                 mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> nnx.Module:
  """The model of ``model_cfg`` with its parameters read from HF directory ``path``.

  ``model_cfg`` is :func:`model_config`'s block, possibly changed in what
  does not change the parameters (dtypes, attention pattern and impl,
  remat). Parameters the checkpoint has no tensor for (e.g. the gate of a
  compressed attention branch added on import) keep their initialisation
  from ``seed``. With ``mesh`` every parameter lands on its logical sharding.
  """
  d = model_dir(path)
  arch = architectures.of_config_json(read_config(d), str(d / "config.json"))
  cfg = models.family_config(model_cfg)
  abstract = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  meta = {p: v for p, v in nnx.to_flat_state(state)}
  tensors = {t.path: t for t in arch.tensors(cfg)}
  fresh = [p for p in _paths(pure) if p not in tensors]
  with TensorReader(d) as reader:
    known = {t.name for t in tensors.values()}
    extra = sorted(n for n in reader.files if n not in known
                   and not n.endswith(IGNORED_SUFFIXES))
    if extra:
      raise HFError(reader.files[extra[0]], f"tensor {extra[0]} has no place in a "
                    f"{arch.name} with this config.json ({len(extra)} such tensors)")
    for t in tensors.values():
      if t.name not in reader.files:
        raise HFError(d, f"tensor {t.name} is missing ({arch.name} with this config.json "
                      "needs it)")
    # File by file (each is closed when read), so at most one file's pages stay mapped.
    for p, t in sorted(tensors.items(), key=lambda item: str(reader.files[item[1].name])):
      if p not in meta:
        raise HFError(d, f"tensor {t.name} maps to {'.'.join(map(str, p))}, which this "
                      "model does not have")
      var = meta[p]
      value = var.get_value()
      where = reader.files[t.name]
      block = _reader_fn(reader, t, value.shape, value.dtype, where)
      if mesh is None:
        _set(pure, p, jnp.asarray(block(None)))
      else:
        names = var.get_metadata().get("out_sharding")
        sharding = sharding_lib.logical_sharding(mesh, names, value.shape)
        _set(pure, p, _place(block, value.shape, sharding))
      reader.done(t.name)
  if fresh:
    for p, value in zip(fresh, _initial_values(model_cfg, fresh, seed)):
      _set(pure, p, value)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _initial_values(model_cfg: Mapping[str, Any], paths: list[tuple], seed: int) -> list:
  """The initial values of some parameters; jit drops the rest of the init."""
  def init():
    pure = nnx.to_pure_dict(nnx.state(models.build(model_cfg, rngs=nnx.Rngs(seed))))
    return [_get(pure, p) for p in paths]
  return jax.jit(init)()


def load(path: str | pathlib.Path, *, dtype: str | None = None,
         mesh: jax.sharding.Mesh | None = None):
  """(model, config, tokenizer) of a local Hugging Face model directory.

  ``config`` is a ConfigDict with ``name`` and ``model`` (the block of
  :func:`model_config`), as a run's config; ``tokenizer`` reads the
  directory's tokenizer.json (``gemkit.tokenizer.HFTokenizer``). Every error
  (missing config.json, unsupported architecture, missing or misshapen
  tensor, pickle-only directory, missing tokenizer) is one line naming the
  file, tensor or key, raised before anything compiles.
  """
  model_cfg = model_config(path, dtype=dtype)
  tokenizer = tokenizer_lib.HFTokenizer.from_dir(path)
  model = load_weights(model_cfg, path, mesh=mesh)
  config = ml_collections.ConfigDict({"name": pathlib.Path(path).resolve().name,
                                      "model": model_cfg})
  return model, config, tokenizer


def _float_model(model: nnx.Module) -> nnx.Module:
  """``model`` with LoRA/DoRA adapters merged (a copy); quantized layers refused."""
  for path, m in nnx.iter_modules(model):
    if isinstance(m, layers.Dense) and m.is_quantized:
      raise ValueError(f"{'.'.join(map(str, path))} is quantized ({m.quant_layout[0]}): "
                       "transformers cannot read gemkit's quantized layout; export the "
                       "float model")
  if not lora.wrappers(model):
    return model
  model = nnx.clone(model)
  if not any(w.merged for _, w in lora.wrappers(model)):
    lora.merge(model)
  return lora.unwrap(model)


def save(model: nnx.Module, config: Any, out_dir: str | pathlib.Path,
         tokenizer: tokenizer_lib.Tokenizer | None = None, *,
         max_shard_size: int = 5 * 2**30) -> pathlib.Path:
  """Writes a directory that ``transformers.AutoModelForCausalLM`` loads.

  ``config``: a run config (with ``model``) or a ``config.model`` block.
  The architecture is the first of ``architectures.ARCHITECTURES`` that can
  express the model (an error lists why each cannot); adapters are merged;
  tensors keep the parameters' dtype; files over ``max_shard_size`` bytes
  are split with an index. ``tokenizer`` (if given) writes its files and
  sets the special-token ids of config.json.
  """
  model_cfg = config["model"] if "model" in config else config
  cfg = models.family_config(model_cfg)
  arch = architectures.for_model(cfg)
  model = _float_model(model)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = arch.tensors(cfg)
  covered = {t.path for t in tensors}
  left = [p for p in _paths(pure) if p not in covered]
  if left:
    raise ValueError(f"parameter {'.'.join(map(str, left[0]))} has no place in {arch.name}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)

  def arrays():
    for t in tensors:
      a = np.asarray(jax.device_get(_get(pure, t.path)))
      a = t.to_hf(a) if t.to_hf is not None else (a.T if t.transpose else a)
      if t.shift:
        a = (a.astype(np.float32) + np.float32(t.shift)).astype(a.dtype)
      yield t.name, a

  write_tensors(out, arrays(), max_shard_size)
  hf = arch.from_config(cfg)
  if tokenizer is not None:
    tokenizer.save(out)
    hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
              pad_token_id=tokenizer.pad_id)
  write_json(out / "config.json", hf)
  return out
