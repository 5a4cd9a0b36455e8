"""Checkpoints: an orbax CheckpointManager holding state, data iterator and metadata.

A step directory holds three items:
  state  the train state pytree (params, optimizer state, step, RNG, counters).
         On several processes every process writes the shards it holds (and
         the primary the metadata); a restore reads them onto any mesh, any
         device count and any process count, because it restores against an
         abstract target (ShapeDtypeStructs) that carries the target shardings.
  data   the Grain iterator state, one file per process
         (``process_<i>-of-<n>.json``): exact data order on resume. Every
         process consumes one batch per step, so all files hold the same
         position; a restart with another process count resumes from it.
  meta   JSON (written by the primary process): the model config (to refuse an
         incompatible model), the data config and corpus fingerprint.

orbax writes a step to a temporary directory and renames it to ``<step>`` only
when every process has finished, so ``latest_step`` never sees a half-written
step and a run killed mid-save resumes from the last complete one. The
directory is a local path; on several hosts, one every host mounts (NFS, ...).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from gemkit.config import ConfigError


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target.

  Leaves that already are ShapeDtypeStructs (an abstract state built with
  ``jax.eval_shape`` and the target shardings) pass through unchanged.
  """
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
  """Grain's per-process iterator files, restorable under another process count.

  Restoring with the process count it was saved with reads this process's own
  file. With another count, it reads the position all saving processes agree
  on (they do when each consumes one batch per step, as ``Trainer`` does).
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = pathlib.Path(directory) / (
        f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if own.exists():
      return super().restore(directory, item=item)
    saved = sorted(pathlib.Path(directory).glob("process_*-of-*.json"))
    if not saved:
      raise ConfigError("workdir", f"{directory} holds no data iterator state")
    states = {f.read_text() for f in saved}
    if len(states) != 1:
      raise ConfigError("workdir", f"{directory} holds {len(saved)} data iterator states "
                        "at different positions; resume with the process count that "
                        f"saved them ({saved[0].stem.split('-of-')[-1]})")
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Keep-N, optionally asynchronous checkpoints under ``directory``.

  Every process of a multi-process run constructs one on the same (shared)
  directory and calls ``save``/``restore`` at the same steps. A context
  manager: ``with Checkpointer(d, async_save=False) as ck: ...`` waits for
  pending saves and closes the manager on exit.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": DataIteratorHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def latest_step(self) -> int | None:
    """The newest complete step (None if there is none)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete step, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, data_iter=None, *,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = DataSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target: Any = None, data_iter=None) -> Any:
    """The state of ``step`` laid out as ``target`` (and the iterator, in place).

    ``target`` is a pytree of arrays or of ShapeDtypeStructs whose shardings
    say where each restored array goes (any mesh, any device count). None
    restores the state as it was saved (nested dicts of arrays, with the
    string keys orbax writes).
    """
    items = {"state": ocp.args.StandardRestore(
        None if target is None else abstract_like(target))}
    if data_iter is not None:
      items["data"] = DataRestore(data_iter)
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
