"""Checkpoints: an orbax CheckpointManager holding state, data iterator and metadata.

A step directory holds three items:
  state  the train state pytree (params, optimizer state, step, RNG); sharded
         arrays are saved by every process and restored onto any mesh by
         restoring against an abstract target that carries shardings.
  data   the Grain iterator state (exact data order on resume).
  meta   JSON: the model config (to refuse an incompatible model), the data
         config and corpus fingerprint, the step.
orbax writes a step to a temporary directory and renames it when complete,
so a run killed mid-save resumes from the last complete step.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from gemkit.config import ConfigError


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Keep-N, optionally asynchronous checkpoints under ``directory``."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, data_iter=None, *,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target: Any, data_iter=None) -> Any:
    """Restores the state onto ``target``'s shapes/shardings (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_like(target))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_compatible(saved: dict, current: dict, where: str, section: str = "model") -> None:
  """ConfigError naming the first ``section`` key whose value differs."""
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      raise ConfigError(
          f"{section}.{key}",
          f"{where} holds a checkpoint of an incompatible {section} "
          f"(checkpoint: {saved.get(key)!r}, config: {current.get(key)!r}); "
          "use another --workdir or the checkpoint's config")
