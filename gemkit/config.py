"""Experiment configs: ml_collections ConfigDicts, overrides and validation.

An experiment is a Python file with ``get_config() -> ConfigDict`` (see
``experiments/``). Launchers take ``--config=experiments/x.py`` and any number
of ``--config.a.b=value`` overrides (ml_collections' ``config_flags``);
notebooks call :func:`load` with the same overrides as keyword arguments.
Unknown keys, ill-typed values and invalid combinations are reported as one
line naming the key (:class:`ConfigError`), never as a traceback.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "experiments/lm_tiny.py"

SCHEDULES = ("cosine", "wsd", "constant")
WSD_DECAYS = ("linear", "cosine", "exp", "sqrt")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("stdlib", "text", "jsonl")


class ConfigError(ValueError):
  """A config key holds a value that cannot work; the message names the key."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config error: {key}: {message}")
    self.key = key


def resolve_config_path(path: str) -> pathlib.Path:
  """``path`` as given, else relative to the repository root."""
  p = pathlib.Path(path)
  if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
    p = REPO_ROOT / p
  if not p.exists():
    raise ConfigError("config", f"no config file at {path!r}")
  return p


def load_file(path: str) -> ml_collections.ConfigDict:
  """Imports the config file at ``path`` and returns its ``get_config()``."""
  p = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location(f"_gemkit_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError("config", f"{p} has no get_config()")
  return module.get_config()


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets dotted ``key`` to ``value``; the key must exist and the type match.

  Strings are parsed as the existing value's type, so ``"200"`` sets an int.
  """
  *parents, leaf = key.split(".")
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ConfigError(".".join(parents[:i + 1]), "unknown config key")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(key, "unknown config key")
  current = node[leaf]
  if isinstance(value, str) and not isinstance(current, str) and current is not None:
    value = _parse_as(key, value, type(current))
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(key, f"cannot set {value!r}: {e}") from None


def _parse_as(key: str, text: str, kind: type) -> Any:
  if kind is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(key, f"expected a bool, got {text!r}")
  try:
    return kind(text)
  except (TypeError, ValueError):
    raise ConfigError(key, f"expected {kind.__name__}, got {text!r}") from None


def load(path: str = DEFAULT_CONFIG, *,
         validator: Callable[[ml_collections.ConfigDict], None] | None = None,
         **overrides: Any) -> ml_collections.ConfigDict:
  """Loads, overrides and validates a config (the notebook entry point).

  ``validator`` as in :func:`flags_parser` (default :func:`validate`, for
  experiment configs; e.g. ``gemkit.studies.finetune.validate_config``).

  >>> cfg = load("experiments/lm_tiny.py", **{"train.steps": 50})
  """
  config = load_file(path)
  for key, value in overrides.items():
    override(config, key, value)
  (validator or validate)(config)
  return config


def _require(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(key, message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for values that cannot work together."""
  m, d, t = config.model, config.data, config.train
  if m.get("init_from"):
    _require((pathlib.Path(m.init_from) / "config.json").is_file(), "model.init_from",
             f"{m.init_from!r} is not a Hugging Face model directory (no config.json)")
  validate_model(m)
  _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
  _require(m.param_dtype in DTYPES, "model.param_dtype",
           f"must be one of {DTYPES}, got {m.param_dtype!r}")
  _require(0.0 <= m.dropout_rate < 1.0, "model.dropout_rate",
           f"must be in [0, 1), got {m.dropout_rate}")
  _require(d.source in DATA_SOURCES, "data.source",
           f"must be one of {DATA_SOURCES}, got {d.source!r}")
  if d.source in ("text", "jsonl"):
    _require(bool(d.path), "data.path", f"data.source={d.source!r} needs a path")
    for p in d.path.split(","):
      _require(os.path.exists(p), "data.path", f"no such file: {p!r}")
  _require(d.seq_len > 0, "data.seq_len", f"must be > 0, got {d.seq_len}")
  _require(0.0 < d.heldout_fraction < 1.0, "data.heldout_fraction",
           f"must be in (0, 1), got {d.heldout_fraction}")
  for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints"):
    _require(t[key] > 0, f"train.{key}", f"must be > 0, got {t[key]}")
  _require(t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"must divide train.batch_size={t.batch_size}, got {t.grad_accum}")
  _require(t.schedule in SCHEDULES, "train.schedule",
           f"must be one of {SCHEDULES}, got {t.schedule!r}")
  _require(t.wsd_decay in WSD_DECAYS, "train.wsd_decay",
           f"must be one of {WSD_DECAYS}, got {t.wsd_decay!r}")
  _require(0.0 <= t.decay_fraction <= 1.0, "train.decay_fraction",
           f"must be in [0, 1], got {t.decay_fraction}")
  _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
  _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
  _require(t.get("max_nonfinite_steps", 0) >= 0, "train.max_nonfinite_steps",
           f"must be >= 0 (0: never stop), got {t.get('max_nonfinite_steps')}")
  _require(isinstance(t.get("compilation_cache_dir", ""), str), "train.compilation_cache_dir",
           f"must be a directory, 'auto' or '' (off), got {t.get('compilation_cache_dir')!r}")
  _validate_mesh(config)


def validate_model(model_cfg: ml_collections.ConfigDict) -> None:
  """Every family checks its own keys, in its config class (``models.family_config``).

  A field that cannot work is ``config error: model.<field>: ...``; anything
  else the class rejects (a missing key) is ``config error: model: ...``.
  """
  import models  # pylint: disable=g-import-not-at-top  (jax only once a config is checked)
  from models import layers  # pylint: disable=g-import-not-at-top
  try:
    models.family_config({"family": "transformer", **model_cfg})
  except layers.FieldError as e:
    raise ConfigError(f"model.{e.field}", e.message) from None
  except (TypeError, ValueError) as e:
    raise ConfigError("model", str(e)) from None


MESH_AXES = ("data", "fsdp", "sequence", "tensor")   # the device mesh (gemkit.sharding)
# Model families whose layers are correct with the sequence axis split.
SEQUENCE_PARALLEL_FAMILIES = ("transformer",)


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
  """Per-slice (mesh.<axis>) and cross-slice (mesh.dcn_<axis>) sizes; absent keys are 1."""
  mesh = config.mesh
  for prefix in ("", "dcn_"):
    keys = [prefix + a for a in MESH_AXES]
    for key in keys:
      v = mesh.get(key, 1)
      _require(isinstance(v, int) and (v == -1 or v > 0), f"mesh.{key}",
               f"must be -1 or > 0, got {v!r}")
    _require([mesh.get(k, 1) for k in keys].count(-1) <= 1, "mesh",
             f"at most one of {keys} may be -1")
  sequence = mesh.get("sequence", 1) * mesh.get("dcn_sequence", 1)
  if sequence != 1:
    _require(config.model.family in SEQUENCE_PARALLEL_FAMILIES, "mesh.sequence",
             f"model.family={config.model.family!r} does not support sequence "
             f"parallelism (supported: {SEQUENCE_PARALLEL_FAMILIES})")
    _require(sequence < 0 or config.data.seq_len % sequence == 0, "mesh.sequence",
             f"mesh.sequence x mesh.dcn_sequence = {sequence} must divide "
             f"data.seq_len={config.data.seq_len}")


_config_default = [DEFAULT_CONFIG]   # the --config default of this process's launcher


def define_config_flag(default: str = DEFAULT_CONFIG):
  """``--config`` (a config file) with ``--config.a.b=value`` overrides.

  ml_collections applies the overrides while the flag is defined (with the
  file named anywhere on the command line, moved first) and raises a bare
  AttributeError for an unknown key; that, and a missing file, become one
  line naming the key or the file (the same when the flags are parsed
  again by :func:`flags_parser`).
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _config_default[0] = default
  sys.argv[:] = _config_file_first(sys.argv)   # read while the flag is defined
  named = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")]
  try:
    if named:
      resolve_config_path(named[0])
  except ConfigError as e:
    _exit(str(e))
  try:
    return config_flags.DEFINE_config_file("config", default, "Experiment config file.",
                                           lock_config=True)
  except (AttributeError, KeyError):
    _exit(str(_unknown_override(sys.argv, default)))


def _unknown_override(argv: Sequence[str], default: str) -> ConfigError:
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default)
  config = load_file(path)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg.split("=", 1)[0].removeprefix("--config.")
    node, walked = config, []
    for name in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        choices = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        near = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean {'.'.join(walked + near)!r}?)" if near else ""
        return ConfigError(key, f"unknown config key{hint}")
      walked.append(name)
      node = node[name]
  return ConfigError("config", "invalid override")


def flags_parser(argv: Sequence[str],
                 validator: Callable[[ml_collections.ConfigDict], None] | None = None
                 ) -> list[str]:
  """An ``app.run(flags_parser=...)`` that reports flag and config errors in one line.

  ``validator`` checks ``--config`` (default :func:`validate`, for experiment
  configs); a launcher with another kind of config passes its own with
  ``functools.partial``.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(_config_file_first(argv))
    if "config" in flags.FLAGS:
      config = flags.FLAGS.config
      if not isinstance(config, ml_collections.ConfigDict):
        path = flags.FLAGS["config"].config_filename
        resolve_config_path(path)
        raise ConfigError("config", f"cannot load {path!r}")
      (validator or validate)(config)
    return rest
  except flags.Error as e:
    _exit(str(e))
  except ConfigError as e:
    _exit(str(e))
  except (AttributeError, KeyError):   # ml_collections applying an unknown override
    _exit(str(_unknown_override(argv, _config_default[0])))
  return []


def _config_file_first(argv: Sequence[str]) -> list[str]:
  """``argv`` with ``--config=FILE`` (or ``--config FILE``) moved before the
  ``--config.a.b=...`` overrides: absl applies overrides only after the file,
  and refuses them in front of it."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return [argv[0], arg] + argv[1:i] + argv[i + 1:]
    if arg == "--config" and i + 1 < len(argv):
      return [argv[0], arg, argv[i + 1]] + argv[1:i] + argv[i + 2:]
  return argv


def _exit(message: str) -> None:
  print(message.splitlines()[0], file=sys.stderr)
  sys.exit(2)


def launch(run: Callable[[], Any],
           validator: Callable[[ml_collections.ConfigDict], None] | None = None) -> None:
  """A launcher's entry point: ``app.run`` with :func:`flags_parser` (one-line
  flag and config errors, exit 2), then ``run()`` under :func:`run_guarded`,
  with absl logging at WARNING (orbax logs every save at INFO)."""
  from absl import app, logging  # pylint: disable=g-import-not-at-top

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run_guarded(run)

  app.run(main, flags_parser=functools.partial(flags_parser, validator=validator))


def run_guarded(main: Callable[[], Any]) -> Any:
  """Runs ``main``; a ConfigError (or a data error) exits with its one line."""
  try:
    return main()
  except ConfigError as e:
    _exit(str(e))
