"""Device mesh, logical-axis sharding rules and multi-process start-up.

The mesh has the axes ``(data, fsdp, sequence, tensor)``. Each axis has a
per-slice size (ICI: the fast links inside one TPU slice or one GPU host;
``config.mesh.data`` ...) and a cross-slice size (DCN: the data-centre network
between slices; ``config.mesh.dcn_data`` ...). The mesh axis is their product:

    mesh[a] = mesh.<a> * mesh.dcn_<a>          a in data, fsdp, sequence, tensor

One ICI size may be -1 (the devices of a slice left over) and one DCN size may
be -1 (the slices left over). A "slice" is a TPU slice (``device.slice_index``)
when the devices span several; otherwise (one slice, GPU hosts, CPU) it is one
process when any DCN size is not 1, and the whole job when all are 1. Cross-slice
axes are outermost, so only the collectives of the axes given DCN sizes (data
parallelism, usually) cross the slower network.

Parameters and activations carry logical axis names (``models.layers.param``,
``models.layers.constrain``); ``RULES`` maps them onto mesh axes:

  batch    -> (data, fsdp)   activations' batch is split over both
  seq      -> sequence       sequence parallelism (model families that support it)
  embed    -> fsdp           parameters are fully sharded along d_model
  heads, kv_heads, mlp, vocab -> tensor   (Megatron-style tensor parallelism)

A name with no rule (head_dim, ...) is replicated. Ops that may run a
Pallas kernel run per shard inside the sharded model
(``models.layers.shard_map_op``: rows and heads, no gather of their inputs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import linen, nnx
from flax.core import spmd
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemkit.config import MESH_AXES as AXES   # one list of mesh axes: config checks it jax-free
from gemkit.config import ConfigError

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
# Environment variables read by initialize_distributed (flags take precedence).
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# --- mesh ---------------------------------------------------------------------


def axis_sizes(mesh_cfg, prefix: str = "") -> tuple[int, ...]:
  """The configured (data, fsdp, sequence, tensor) sizes; absent keys are 1."""
  return tuple(int(mesh_cfg.get(prefix + a, 1)) for a in AXES)


def _resolve(sizes: Sequence[int], total: int, prefix: str, what: str) -> tuple[int, ...]:
  named = {prefix + a: s for a, s in zip(AXES, sizes)}
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ConfigError("mesh", f"at most one of {list(named)} may be -1, got {named}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ConfigError("mesh", f"{named} does not divide the {total} {what}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ConfigError("mesh", f"{named} needs {math.prod(sizes)} {what}, have {total}")
  return tuple(sizes)


def _slice_indices(devices: Sequence[Any]) -> set[int]:
  return {getattr(d, "slice_index", 0) for d in devices}


def num_slices(devices: Sequence[Any], mesh_cfg) -> int:
  """Slices (``device.slice_index``) among ``devices`` if more than one; else the
  processes if any DCN size is not 1; else 1."""
  if len(_slice_indices(devices)) > 1:
    return len(_slice_indices(devices))
  if axis_sizes(mesh_cfg, "dcn_") == (1,) * len(AXES):
    return 1
  return len({d.process_index for d in devices})


def mesh_shapes(mesh_cfg, num_devices: int,
                slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(per-slice, cross-slice) sizes of (data, fsdp, sequence, tensor), -1 resolved."""
  if slices > 1 and axis_sizes(mesh_cfg, "dcn_") == (1,) * len(AXES):
    raise ConfigError("mesh", f"the devices form {slices} slices but all mesh.dcn_* sizes "
                      "are 1; set e.g. mesh.dcn_data=-1")
  dcn = _resolve(axis_sizes(mesh_cfg, "dcn_"), slices, "dcn_", "slices")
  if num_devices % slices:
    raise ConfigError("mesh", f"{num_devices} devices do not split into {slices} "
                      "equal slices")
  ici = _resolve(axis_sizes(mesh_cfg), num_devices // slices, "", "devices per slice")
  return ici, dcn


def device_grid(mesh_cfg, devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as the mesh [data, fsdp, sequence, tensor]."""
  slices = num_slices(devices, mesh_cfg)
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), slices)
  try:
    if slices > 1:
      return mesh_utils.create_hybrid_device_mesh(
          ici, dcn, devices, process_is_granule=len(_slice_indices(devices)) == 1,
          allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    raise ConfigError("mesh", f"cannot lay out per-slice {dict(zip(AXES, ici))} x "
                      f"cross-slice {dict(zip(AXES, dcn))} on {len(devices)} "
                      f"{devices[0].device_kind} devices: {e}") from None


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The Mesh of ``config.mesh`` over ``devices`` (default: all devices of the job)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(device_grid(mesh_cfg, devices), AXES)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
  """Makes ``mesh`` and ``RULES`` current (for ``models.layers.constrain``)."""
  with jax.set_mesh(mesh), spmd.logical_axis_rules(RULES):
    yield


def logical_spec(names) -> P:
  """PartitionSpec of a value whose dims have logical ``names`` (None: replicated)."""
  if names is None:
    return P()
  return linen.logical_to_mesh_axes(tuple(names), RULES)


def logical_sharding(mesh: Mesh, names, shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding of a value whose dims have logical ``names`` (None: replicated).

  With ``shape``, a dim that its mesh axes do not divide stays whole along
  them (jax places only even shardings: a vocabulary of 301 on tensor=2 is
  replicated over tensor).
  """
  spec = logical_spec(names)
  if shape is not None:
    size = lambda e: math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ()))
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    spec = P(*(e if n % size(e) == 0 else None for n, e in zip(shape, entries)))
  return NamedSharding(mesh, spec)


def param_shardings(params: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for an ``nnx.State`` of Params, from their logical names and
  shapes (:func:`logical_sharding`)."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return jax.tree.map(lambda spec, x: logical_sharding(mesh, tuple(spec), x.shape),
                      nnx.get_partition_spec(params), shapes,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [B, T]: B split over (data, fsdp), T over sequence."""
  return logical_sharding(mesh, ("batch", "seq"))


def check_batch(mesh: Mesh, batch_size: int, seq_len: int) -> None:
  """ConfigError unless a [batch_size, seq_len] batch splits evenly over the mesh
  and each process holds whole rows of its own (what its data pipeline reads)."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % rows:
    raise ConfigError("train.batch_size", f"{batch_size} rows do not split over the "
                      f"data x fsdp = {rows} devices of the mesh")
  if seq_len % mesh.shape["sequence"]:
    raise ConfigError("data.seq_len", f"{seq_len} does not split over the "
                      f"sequence = {mesh.shape['sequence']} devices of the mesh")
  processes = sorted({d.process_index for d in mesh.devices.flat})
  if len(processes) == 1:
    return
  index_map = batch_sharding(mesh).devices_indices_map((batch_size, seq_len))
  owned: dict[int, set[int]] = {p: set() for p in processes}
  for device, (row_slice, _) in index_map.items():
    owned[device.process_index].update(range(*row_slice.indices(batch_size)))
  share = batch_size // len(processes)
  if any(len(r) != share for r in owned.values()):
    raise ConfigError("mesh", f"each of the {len(processes)} processes reads its own "
                      f"{share} rows of the batch, so the batch axes (data x fsdp, "
                      f"{dict(mesh.shape)}) must split the batch across processes; "
                      "put the cross-process (dcn_*) parallelism on data or fsdp")


# --- batches split over processes, model state on a mesh ---------------------------


def _rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Dim 0 split over data x fsdp (the batch), the other dims whole."""
  return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def process_rows(mesh: Mesh, rows: int) -> np.ndarray:
  """The indices, in order, of the rows of a global [rows, ...] batch (dim 0 split over
  data x fsdp) that this process's devices hold: the rows :func:`global_batch` fills
  from this process's data and :func:`local_rows` returns."""
  mine: set[int] = set()
  for device, (rows_slice,) in _rows_sharding(mesh, 1).devices_indices_map((rows,)).items():
    if device.process_index == jax.process_index():
      mine.update(range(*rows_slice.indices(rows)))
  return np.asarray(sorted(mine), np.int64)


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """A batch whose rows are split over the processes, as one global array: every process
  passes its own rows (the same number each, a multiple of its devices on the batch
  axes); dim 0 is split over data x fsdp. One process: the array on the mesh."""
  local = np.asarray(local)
  sh = _rows_sharding(mesh, local.ndim)
  if jax.process_count() == 1:
    return jax.device_put(local, sh)
  shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sh, local, shape)


def local_rows(mesh: Mesh, x: jax.Array) -> np.ndarray:
  """This process's rows of a global batch (the inverse of :func:`global_batch`; every
  process must call it: with several processes it gathers ``x``)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return full[process_rows(mesh, x.shape[0])]


def place(state: nnx.State, mesh: Mesh) -> nnx.State:
  """``state`` (any variables: float or quantized weights, adapters) on ``mesh`` by
  their logical names (:func:`param_shardings`), in place; returns it.

  Arrays may be on one device of this process (every process holding the same
  values) or already global; those already placed as asked are kept.
  """
  shardings = nnx.to_pure_dict(param_shardings(state, mesh))

  def put(x, sh):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(sh, x.ndim):
        return x
      if not x.is_fully_addressable:
        return jax.jit(lambda y: y, out_shardings=sh)(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sh)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])

  nnx.replace_by_pure_dict(state, jax.tree.map(put, nnx.to_pure_dict(state), shardings))
  return state


# --- multi-process start-up -----------------------------------------------------


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(name, f"must be an integer, got {value!r}") from None


def _cluster_detected() -> str | None:
  """The multi-process environment jax can configure itself from, if any."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
      return "Cloud TPU VM"
  except ImportError:  # pragma: no cover
    pass
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(v in os.environ for v in slurm) and int(os.environ["SLURM_NTASKS"]) > 1:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 and (
      "OMPI_MCA_orte_hnp_uri" in os.environ):
    return "Open MPI"
  return None


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # pragma: no cover
    return False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when this is one process of a multi-process job.

  In order: explicit arguments (the launchers' ``--coordinator_address``,
  ``--num_processes``, ``--process_id``), else the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; else
  jax's own detection on a Cloud TPU VM (every worker of a pod), under SLURM
  (``srun`` with more than one task) or Open MPI. Otherwise, a single process:
  nothing to do. Must run before anything touches a device; a second call is
  a no-op. Returns whether ``jax.distributed`` is initialized.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  cluster = None if explicit else _cluster_detected()
  if not explicit and cluster is None:
    return False
  if explicit and num_processes == 1:
    return False
  if _backends_initialized():
    if explicit:
      raise RuntimeError("initialize_distributed() must run before any jax computation "
                         "(jax.devices(), jit, ...) in this process")
    logging.info("gemkit: %s detected but jax is already in use; not starting "
                 "jax.distributed (single process)", cluster)
    return False
  if explicit:
    missing = [name for name, value in (("coordinator address", coordinator_address),
                                        ("number of processes", num_processes),
                                        ("process id", process_id)) if value is None]
    if missing and _cluster_detected() is None:
      raise ConfigError("distributed", f"a multi-process run needs the {', '.join(missing)} "
                        f"(--coordinator_address/--num_processes/--process_id or "
                        f"${ENV_COORDINATOR}/${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID})")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True
