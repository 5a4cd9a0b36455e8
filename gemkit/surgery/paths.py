"""Module paths of an NNX model, and the selection of layers by rules over them.

A module path is the attribute path from the model root joined by ``/``
(``blocks/0/mlp/gate_proj``): the name quantization and LoRA rules match,
checkpoints record and errors print. Both kinds of surgery pick layers the
same way (:func:`select`): each layer takes the first rule that matches its
path, and a rule that selects nothing is an error, since a typo in a regex
would otherwise change nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from flax import nnx

from models import layers


def join(path: Sequence[Any]) -> str:
  """The ``/``-joined module path of an ``nnx.iter_modules`` path tuple."""
  return "/".join(map(str, path))


def get(model: nnx.Module, path: Sequence[Any]):
  """The submodule at a path tuple (list items by int key)."""
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) or isinstance(node, nnx.Dict) else getattr(node, key)
  return node


def put(model: nnx.Module, path: Sequence[Any], value) -> None:
  """Replaces the submodule at a path tuple by ``value``, in place."""
  parent, key = get(model, path[:-1]), path[-1]
  if isinstance(key, int) or isinstance(parent, nnx.Dict):
    parent[key] = value
  else:
    setattr(parent, key, value)


def dense_layers(model: nnx.Module) -> list[tuple[str, layers.Dense]]:
  """(path, Dense) of every ``models.layers.Dense`` of ``model``, in module order."""
  return [(join(path), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, layers.Dense)]


def select(paths: Sequence[str], matches: Sequence[Callable[[str], bool]], *,
           names: Sequence[str], what: str,
           required: Sequence[bool] | None = None) -> list[int | None]:
  """For each path, the index of the first rule whose ``matches(path)`` holds (None: none).

  ``names`` label the rules in the error; a rule with ``required`` (default:
  every rule) that selects no path is a ValueError that lists the paths.
  """
  chosen = [next((i for i, m in enumerate(matches) if m(p)), None) for p in paths]
  required = [True] * len(matches) if required is None else required
  idle = [names[i] for i in range(len(matches)) if required[i] and i not in chosen]
  if idle:
    raise ValueError(f"{what} rule(s) {idle} matched no Dense layer; the Dense paths are "
                     f"{list(paths[:6])}{' ...' if len(paths) > 6 else ''}")
  return chosen
