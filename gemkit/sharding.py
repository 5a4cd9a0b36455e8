"""Device mesh over (data, fsdp, tensor) and logical-axis sharding rules.

Parameters carry logical axis names (``models.layers.param``); ``RULES`` maps
them onto mesh axes:

  batch    -> (data, fsdp)   activations' batch is split over both
  embed    -> fsdp           parameters are fully sharded along d_model
  heads, kv_heads, mlp, vocab -> tensor   (Megatron-style tensor parallelism)

A name with no rule (seq, head_dim, ...) is replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import jax
import numpy as np
from flax import linen, nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemkit.config import ConfigError

AXES = ("data", "fsdp", "tensor")
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one -1 takes the devices left over."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError("mesh", f"at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError("mesh", f"{dict(zip(AXES, sizes))} does not divide "
                        f"{num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError("mesh", f"{dict(zip(AXES, sizes))} needs {math.prod(sizes)} "
                      f"devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
  """Makes ``mesh`` and ``RULES`` current (for ``models.layers.constrain``)."""
  with jax.set_mesh(mesh), spmd.logical_axis_rules(RULES):
    yield


def logical_sharding(mesh: Mesh, names) -> NamedSharding:
  """NamedSharding of a value whose dims have logical ``names`` (None: replicated)."""
  if names is None:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, linen.logical_to_mesh_axes(tuple(names), RULES))


def param_shardings(params: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for an ``nnx.State`` of Params, from their logical names."""
  return jax.tree.map(lambda spec: logical_sharding(mesh, tuple(spec)),
                      nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [B, ...]: B split over (data, fsdp)."""
  return NamedSharding(mesh, P(("data", "fsdp")))
