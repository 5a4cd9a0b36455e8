"""Linear-RNN scans: validation, ``impl`` dispatch, custom VJPs, block sizes.

Public ops (DESIGN.md "Public op contracts"):

* ``linear_scan(a, b, *, h0, reverse)``: h_t = a_t * h_{t-1} + b_t, [B, T, D].
* ``chunked_linear_attention(q, k, v, log_decay, *, initial_state,
  chunk_size)``: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t.
* ``delta_rule(q, k, v, beta, log_decay, *, initial_state, chunk_size)``:
  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t.

All take float32 / bfloat16 (/ float16) inputs, keep the state and every
accumulation in float32, return the outputs in the inputs' dtype and the
final state in float32, so that a sequence run in pieces (passing the state
on) equals the whole. Ragged T (and K, V, D on the kernels) is padded inside
and sliced off. ``impl="auto"`` is ``"xla"`` until a kernel is measured
faster on a device (the ``*_FASTER`` tables below are empty: no accelerator
measurements exist yet).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ops import common, config
from ops.scan import gpu, reference as ref, tpu

Array = jax.Array
_F32 = jnp.float32
_MODULES = {"pallas_tpu": tpu, "pallas_gpu": gpu}

# device_kind -> (() -> bool): where a Pallas kernel was measured faster than
# XLA. Empty: nothing has been timed on a TPU or GPU yet, so "auto" = "xla".
LINEAR_SCAN_FASTER: dict = {}
LINEAR_ATTENTION_FASTER: dict = {}
DELTA_RULE_FASTER: dict = {}
# device_kind -> tuned block sizes. Empty for the same reason.
_TUNED_SCAN: dict = {}
_TUNED_CHUNK: dict = {}


def _is_tpu(device_kind: str) -> bool:
  return "tpu" in device_kind.lower()


def _kernel_device_kind(impl: str) -> str:
  """The device the kernel targets: the real one, or "TPU" / "GPU" when it
  is interpreted on another backend."""
  target = impl.removeprefix("pallas_")
  return common.device_kind() if jax.default_backend() == target else target.upper()


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ScanBlockSizes:
  """Tiles of the ``linear_scan`` kernels.

  Attributes:
    block_t: TPU: time rows per grid step (a multiple of 8, 16 for 16-bit
      dtypes). GPU: rows loaded ahead per loop step.
    block_d: channels per program (TPU: a multiple of 128; GPU: a power of 2).
  """
  block_t: int
  block_d: int

  @classmethod
  def get_default(cls, shape, dtype, device_kind: str) -> "ScanBlockSizes":
    """Defaults for a [B, T, D] scan on ``device_kind`` (untuned)."""
    if device_kind in _TUNED_SCAN:
      return _TUNED_SCAN[device_kind]
    _, t, d = shape
    if _is_tpu(device_kind):
      dp = common.round_up(d, 128)
      block_d = next(bd for bd in (512, 256, 128) if dp % bd == 0)
      return cls(min(256, common.round_up(t, tpu.sublanes(dtype))), block_d)
    return cls(min(8, common.next_pow2(t)), min(128, common.next_pow2(d)))

  def validate(self, impl: str, dtype) -> None:
    _check_int("block_sizes.block_t", self.block_t)
    _check_int("block_sizes.block_d", self.block_d)
    if impl == "pallas_tpu" and (self.block_t % tpu.sublanes(dtype)
                                 or self.block_d % 128):
      raise ValueError(
          f"block_sizes for pallas_tpu need block_t % {tpu.sublanes(dtype)} "
          f"== 0 and block_d % 128 == 0, got {self}")
    if impl == "pallas_gpu" and not common.is_pow2(self.block_d):
      raise ValueError(f"block_sizes.block_d for pallas_gpu must be a power "
                       f"of 2, got {self.block_d}")


@dataclasses.dataclass(frozen=True)
class ChunkBlockSizes:
  """Tiles of the chunked kernels (``chunked_linear_attention``, ``delta_rule``).

  Attributes:
    block_v: value columns per program (TPU: a multiple of 128, or all of V;
      GPU: a power of 2 >= 16). Programs over V tiles run in parallel; the
      decay-weighted scores are recomputed per tile.
    sub_chunk: kernels, per-key-dim (GLA) decay: the state is stepped
      through sub-chunks of this many tokens, whose scores are evaluated
      element-wise in log space ([sub, sub, K]). Rounded down to a divisor
      of the chunk (a multiple of 8 on TPU). Unused by the XLA path.
  """
  block_v: int
  sub_chunk: int = 16

  @classmethod
  def get_default(cls, shape, dtype, device_kind: str) -> "ChunkBlockSizes":
    """Defaults for q [B, T, H, K] and v [.., V], shape = (B, T, H, K, V)."""
    del dtype
    if device_kind in _TUNED_CHUNK:
      return _TUNED_CHUNK[device_kind]
    v = shape[-1]
    if _is_tpu(device_kind):
      return cls(v if v <= 512 or v % 128 else
                 next(bv for bv in (512, 256, 128) if v % bv == 0))
    return cls(min(64, max(16, common.next_pow2(v))))

  def validate(self, impl: str, vdim: int) -> None:
    _check_int("block_sizes.block_v", self.block_v)
    _check_int("block_sizes.sub_chunk", self.sub_chunk)
    if impl == "pallas_tpu" and not (self.block_v == vdim
                                     or self.block_v % 128 == 0):
      raise ValueError(f"block_sizes.block_v for pallas_tpu must be V={vdim} "
                       f"or a multiple of 128, got {self.block_v}")
    if impl == "pallas_tpu" and self.sub_chunk < 8:
      raise ValueError(f"block_sizes.sub_chunk for pallas_tpu must be >= 8, "
                       f"got {self.sub_chunk}")
    if impl == "pallas_gpu" and not (common.is_pow2(self.block_v)
                                     and common.is_pow2(self.sub_chunk)
                                     and min(self.block_v, self.sub_chunk) >= 16):
      raise ValueError(f"block_sizes for pallas_gpu need powers of 2 >= 16, "
                       f"got {self}")


# ------------------------------------------------------------------ linear_scan


@dataclasses.dataclass(frozen=True)
class _ScanPlan:
  """Static settings of one linear_scan call; callable as (a, b, h0, reverse)."""
  impl: str
  xla_method: str
  block: Optional[ScanBlockSizes]
  interpret: Any

  def __call__(self, a, b, h0, reverse):
    if self.impl == "xla":
      run = (ref.linear_scan_sequential if self.xla_method == "sequential"
             else ref.linear_scan_associative)
      return run(a, b, h0, reverse)
    _, t, d = a.shape
    bt, bd = self.block.block_t, self.block.block_d
    # a = 1, b = 0 past the end leaves the state unchanged in both directions.
    a = common.pad_axis(common.pad_axis(a, 1, bt, 1), 2, bd, 1)
    b = common.pad_axis(common.pad_axis(b, 1, bt), 2, bd)
    h0 = common.pad_axis(h0.astype(_F32)[:, None], 2, bd)
    h, h_last = _MODULES[self.impl].linear_scan(
        a, b, h0, reverse=reverse, block_t=bt, block_d=bd,
        interpret=self.interpret)
    return h[:, :t, :d], h_last[:, 0, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a, b, h0, reverse, plan):
  return plan(a, b, h0, reverse)


def _scan_fwd(a, b, h0, reverse, plan):
  h, h_last = plan(a, b, h0, reverse)
  return (h, h_last), (a, h, h0, jnp.zeros((0,), b.dtype))  # b's dtype


def _scan_bwd(reverse, plan, res, cts):
  """The adjoint is the same scan run the other way.

  Forward scan: g_t = dh_t + a_{t+1} g_{t+1} with g_T = d h_last, then
  da_t = g_t h_{t-1}, db_t = g_t, dh0 = a_0 g_0 (mirrored for reverse).
  """
  a, h, h0, b_empty = res
  gh, g_last = cts
  one = jnp.ones_like(a[:, :1])
  h0_ = h0[:, None].astype(h.dtype)
  if reverse:
    a_next = jnp.concatenate([one, a[:, :-1]], axis=1)
    h_prev = jnp.concatenate([h[:, 1:], h0_], axis=1)
  else:
    a_next = jnp.concatenate([a[:, 1:], one], axis=1)
    h_prev = jnp.concatenate([h0_, h[:, :-1]], axis=1)
  g, g_first = plan(a_next, gh.astype(_F32), g_last, not reverse)
  da = g * h_prev.astype(_F32)
  dh0 = a[:, -1 if reverse else 0].astype(_F32) * g_first
  return da.astype(a.dtype), g.astype(b_empty.dtype), dh0.astype(h0.dtype)


_scan.defvjp(_scan_fwd, _scan_bwd)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _linear_scan(a, b, h0, reverse, plan):
  return _scan(a, b, h0, reverse, plan)


def linear_scan(a: Array, b: Array, *, h0: Optional[Array] = None,
                reverse: bool = False, impl: str = "auto", interpret: Any = None,
                block_sizes: Optional[ScanBlockSizes] = None,
                xla_method: Optional[str] = None) -> tuple[Array, Array]:
  """Diagonal linear recurrence h_t = a_t * h_{t-1} + b_t.

  The RG-LRU / Hawk / Mamba-style scan. a_t = 0 resets the state (document
  starts). The gradient is a ``custom_vjp`` whose backward pass is the same
  scan run in the opposite direction, on the same ``impl``.

  Args:
    a, b: [B, T, D], the decay and the input.
    h0: [B, D] state before the first step (default zeros).
    reverse: scan from t = T - 1 down to 0: h_t = a_t * h_{t+1} + b_t.
    impl: "auto" | "xla" | "pallas_tpu" | "pallas_gpu".
    interpret: Pallas interpret setting (None: ``ops.config`` default).
    block_sizes: kernel tiles (default ``ScanBlockSizes.get_default``).
    xla_method: XLA path, "sequential" (``lax.scan``) or "associative"
      (``lax.associative_scan``); default sequential on CPU, where it was
      faster in ``benchmarks/scan.py``, and associative elsewhere.

  Returns:
    h [B, T, D] in the dtype of a * b, and the last state computed [B, D]
    (h[:, -1], or h[:, 0] when reverse) in float32.
  """
  common.check_rank("a", a, 3, "[batch, seq, dim]")
  if b.shape != a.shape:
    raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got "
                     f"{tuple(b.shape)}")
  common.check_float("a", a)
  common.check_float("b", b)
  if a.shape[1] < 1:
    raise ValueError(f"a needs at least one time step, got shape {a.shape}")
  if h0 is not None:
    if tuple(h0.shape) != (a.shape[0], a.shape[2]):
      raise ValueError(f"h0 must have shape [batch, dim] = "
                       f"{(a.shape[0], a.shape[2])}, got {tuple(h0.shape)}")
    common.check_float("h0", h0)
  if xla_method not in (None, "sequential", "associative"):
    raise ValueError(f"xla_method must be None, 'sequential' or "
                     f"'associative', got {xla_method!r}")
  impl = common.select_impl(impl, op="linear_scan", supported=lambda _: True,
                            measured_faster=LINEAR_SCAN_FASTER)
  block, interp = None, None
  if impl != "xla":
    block = block_sizes or ScanBlockSizes.get_default(
        a.shape, a.dtype, _kernel_device_kind(impl))
    block.validate(impl, jnp.result_type(a, b))
    interp = config.resolve_interpret(interpret, impl.removeprefix("pallas_"))
  if xla_method is None:
    xla_method = "sequential" if jax.default_backend() == "cpu" else "associative"
  if h0 is None:
    h0 = jnp.zeros((a.shape[0], a.shape[2]), _F32)
  return _linear_scan(a, b, h0, bool(reverse),
                      _ScanPlan(impl, xla_method, block, interp))


# ------------------------------------------------------------- chunked checks


def _check_qkv(q: Array, k: Array, v: Array) -> None:
  common.check_rank("q", q, 4, "[batch, seq, heads, key_dim]")
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got "
                     f"{tuple(k.shape)}")
  common.check_rank("v", v, 4, "[batch, seq, heads, value_dim]")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must have shape [batch, seq, heads, V] = "
                     f"{tuple(q.shape[:3])} + (V,), got {tuple(v.shape)}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    common.check_float(name, x)
  if q.shape[1] < 1:
    raise ValueError(f"q needs at least one time step, got shape {q.shape}")


def _check_per_head(name: str, x: Optional[Array], q: Array) -> None:
  if x is not None:
    if tuple(x.shape) != tuple(q.shape[:3]):
      raise ValueError(f"{name} must have shape [batch, seq, heads] = "
                       f"{tuple(q.shape[:3])}, got {tuple(x.shape)}")
    common.check_float(name, x)


def _check_state(initial_state: Optional[Array], q: Array, v: Array) -> None:
  if initial_state is not None:
    want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if tuple(initial_state.shape) != want:
      raise ValueError(f"initial_state must have shape [batch, heads, K, V] "
                       f"= {want}, got {tuple(initial_state.shape)}")
    common.check_float("initial_state", initial_state)


def _check_chunk(chunk_size: Any, impl: str) -> None:
  _check_int("chunk_size", chunk_size)
  if impl == "pallas_tpu" and chunk_size % 8:
    raise ValueError(f"chunk_size for pallas_tpu must be a multiple of 8, got "
                     f"{chunk_size}")
  if impl == "pallas_gpu" and not (common.is_pow2(chunk_size) and chunk_size >= 16):
    raise ValueError(f"chunk_size for pallas_gpu must be a power of 2 >= 16, "
                     f"got {chunk_size}")


def _effective_chunk(t: int, chunk_size: int) -> int:
  """The chunk actually used: a short sequence gets a shorter chunk."""
  return chunk_size if t >= chunk_size else min(chunk_size,
                                                max(16, common.next_pow2(t)))


def _effective_sub(chunk: int, sub_chunk: int, impl: str) -> int:
  """The largest divisor of ``chunk`` <= sub_chunk (a multiple of 8 on TPU)."""
  step = 8 if impl == "pallas_tpu" else 1
  return max(d for d in range(step, min(sub_chunk, chunk) + 1, step)
             if chunk % d == 0)


@dataclasses.dataclass(frozen=True)
class _ChunkPlan:
  """Static settings of one chunked call."""
  impl: str
  chunk: int
  sub: int
  block_v: int
  interpret: Any


def _chunk_plan(op: str, q: Array, v: Array, chunk_size: int, impl: str,
                interpret: Any, block_sizes: Optional[ChunkBlockSizes],
                faster: dict) -> _ChunkPlan:
  """Resolves impl, the chunk and the tiles for q [B, T, H, K], v [.., V]."""
  impl = common.select_impl(impl, op=op, supported=lambda _: True,
                            measured_faster=faster)
  _check_chunk(chunk_size, impl)
  kind = common.device_kind() if impl == "xla" else _kernel_device_kind(impl)
  block = block_sizes or ChunkBlockSizes.get_default(
      q.shape + v.shape[-1:], q.dtype, kind)
  interp = None
  if impl != "xla":
    block.validate(impl, v.shape[-1])
    interp = config.resolve_interpret(interpret, impl.removeprefix("pallas_"))
  chunk = _effective_chunk(q.shape[1], chunk_size)
  return _ChunkPlan(impl, chunk, _effective_sub(chunk, block.sub_chunk, impl),
                    block.block_v, interp)


def _pad_time(chunk: int, *xs):
  return tuple(common.pad_axis(x, 1, chunk) for x in xs)


def _pad_dims(plan: _ChunkPlan, kdim: int, vdim: int) -> tuple[int, int]:
  """Padded K and V of the kernels (powers of 2 >= 16 for Triton)."""
  if plan.impl == "pallas_gpu":
    return max(16, common.next_pow2(kdim)), max(plan.block_v, common.next_pow2(vdim))
  return kdim, common.round_up(vdim, plan.block_v)


def _pad_to(x: Array, axis: int, size: int) -> Array:
  return common.pad_axis(x, axis, size) if x.shape[axis] < size else x


def _head_major(x: Array) -> Array:
  """[B, T, H, F] <-> [B, H, T, F]."""
  return jnp.swapaxes(x, 1, 2)


def _chunk_cumsum(g: Array, chunk: int) -> Array:
  """Cumulative sum inside chunks of ``chunk`` along axis 2 of [B, H, T, F]."""
  bsz, nh, t, f = g.shape
  return jnp.cumsum(g.reshape(bsz, nh, t // chunk, chunk, f), axis=3).reshape(
      g.shape)


def _as_rows(x: Array, chunk: int) -> Array:
  """[B, H, T, 1] -> [B, H, T // chunk, 1, chunk]."""
  bsz, nh, t, _ = x.shape
  return x.reshape(bsz, nh, t // chunk, 1, chunk)


# ------------------------------------------------------ chunked_linear_attention


@dataclasses.dataclass(frozen=True)
class _AttnKernels:
  """A backend's linear-attention kernels with their static settings."""
  impl: str
  chunk: int       # math chunk: the chunk, or the sub-chunk for per-key decay
  block_t: int     # tokens per TPU grid step
  block_v: int
  interpret: Any

  def _kw(self):
    return dict(chunk=self.chunk, block_t=self.block_t, block_v=self.block_v,
                interpret=self.interpret)

  def rows(self, g):
    return _as_rows(g, self.chunk) if g.shape[-1] == 1 else None

  def forward(self, q, k, v, g, st0):
    return _MODULES[self.impl].linear_attention_fwd(
        q, k, v, g, self.rows(g), st0, **self._kw())

  def backward(self, q, k, v, g, states, do, dst):
    return _MODULES[self.impl].linear_attention_bwd(
        q, k, v, g, self.rows(g), states, do, dst, **self._kw())


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attn(q, k, v, g, st0, kernels):
  return _attn_fwd(q, k, v, g, st0, kernels)[0]


def _attn_fwd(q, k, v, g, st0, kernels):
  o, st, states = kernels.forward(q, k, v, g, st0)
  return (o, st), (q, k, v, g, states)


def _attn_bwd(kernels, res, cts):
  q, k, v, g, states = res
  do, dst = cts
  dq, dk, dv, dg, dst0 = kernels.backward(q, k, v, g, states, do,
                                          dst.astype(_F32))
  return (dq.sum(2).astype(q.dtype), dk.sum(2).astype(k.dtype),
          dv.astype(v.dtype), dg.sum(2), dst0)


_attn.defvjp(_attn_fwd, _attn_bwd)


def _attention_kernels(q, k, v, g, s0, plan: _ChunkPlan):
  """Kernel path on T-padded inputs: pad K / V, go head-major, transpose the
  state, sum the decay per math chunk, run the custom-VJP kernels."""
  kdim, vdim = q.shape[-1], v.shape[-1]
  kp, vp = _pad_dims(plan, kdim, vdim)
  q, k = (_pad_to(x, 3, kp) for x in (q, k))
  v = _pad_to(v, 3, vp)
  if g.shape[-1] > 1:
    g = _pad_to(g, 3, kp)
  st0 = _pad_to(_pad_to(jnp.swapaxes(s0, 2, 3), 2, vp), 3, kp)
  math = plan.chunk if g.shape[-1] == 1 else plan.sub
  kernels = _AttnKernels(plan.impl, math, plan.chunk, plan.block_v,
                         plan.interpret)
  o, st = _attn(*(_head_major(x) for x in (q, k, v)),
                _chunk_cumsum(_head_major(g), math), st0, kernels)
  return _head_major(o)[..., :vdim], jnp.swapaxes(st, 2, 3)[:, :, :kdim, :vdim]


@functools.partial(jax.jit, static_argnums=(5,))
def _linear_attention(q, k, v, g, s0, plan: _ChunkPlan):
  t = q.shape[1]
  q, k, v, g = _pad_time(plan.chunk, q, k, v, g)
  if plan.impl == "xla":
    o, s = ref.linear_attention_chunked(q, k, v, g, s0, chunk=plan.chunk)
  else:
    o, s = _attention_kernels(q, k, v, g, s0, plan)
  return o[:, :t], s


def chunked_linear_attention(
    q: Array, k: Array, v: Array, log_decay: Optional[Array] = None, *,
    initial_state: Optional[Array] = None, chunk_size: int = 64,
    impl: str = "auto", interpret: Any = None,
    block_sizes: Optional[ChunkBlockSizes] = None) -> tuple[Array, Array]:
  """Decayed linear attention, chunked.

  S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t   (no 1/sqrt(K)
  scaling: scale q yourself). The decay is per head (g [B, T, H]: RetNet,
  Lightning Attention-2, Mamba-2) or per key dim (g [B, T, H, K]: GLA, Yang
  et al. 2024) and should be <= 0 (decays in (0, 1]); None means no decay.

  Chunked algorithm (see ``reference``): within a chunk a causal,
  decay-weighted quadratic form, across chunks the [K, V] state. All decay
  exponents are differences G_i - G_j <= 0 (log space) or, on the XLA
  per-key one-matmul branch, bounded by 60, so strong decays are safe. For
  the per-key decay the XLA path builds the scores with one
  matmul through each chunk's middle row while the decay spans at most 60
  around it (``reference.ONE_MATMUL_SPAN``), else by recursive halving, and
  the kernels step the state through sub-chunks of
  ``block_sizes.sub_chunk`` tokens. Pallas paths (forward and backward
  kernels) are wrapped in a ``custom_vjp``; the XLA path is differentiated
  by JAX (its per-key scores through a small ``custom_vjp``).

  Args:
    q, k: [B, T, H, K]. v: [B, T, H, V].
    log_decay: None, [B, T, H] or [B, T, H, K].
    initial_state: [B, H, K, V] (default zeros).
    chunk_size: tokens per chunk (pallas_tpu: a multiple of 8; pallas_gpu: a
      power of 2 >= 16). Shorter sequences use a shorter chunk.
    impl, interpret: as in ``linear_scan``.
    block_sizes: kernel tiles (default ``ChunkBlockSizes.get_default``).

  Returns:
    o [B, T, H, V] in the inputs' dtype and the final state [B, H, K, V]
    float32.
  """
  _check_qkv(q, k, v)
  if log_decay is not None and log_decay.ndim == 4:
    if log_decay.shape != q.shape:
      raise ValueError(f"log_decay [B, T, H, K] must have the shape of q "
                       f"{tuple(q.shape)}, got {tuple(log_decay.shape)}")
    common.check_float("log_decay", log_decay)
  else:
    _check_per_head("log_decay", log_decay, q)
  _check_state(initial_state, q, v)
  plan = _chunk_plan("chunked_linear_attention", q, v, chunk_size, impl,
                     interpret, block_sizes, LINEAR_ATTENTION_FASTER)
  g = ref.as_decay(log_decay, q).astype(_F32)
  s0 = (jnp.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:], _F32)
        if initial_state is None else initial_state.astype(_F32))
  return _linear_attention(q, k, v, g, s0, plan)


# ------------------------------------------------------------------- delta rule


def _delta_kernel_forward(q, k, v, beta, g, s0, plan: _ChunkPlan):
  """Kernel forward on T-padded inputs (public layout in and out)."""
  kdim, vdim = q.shape[-1], v.shape[-1]
  kp, vp = _pad_dims(plan, kdim, vdim)
  q, k = (_head_major(_pad_to(x, 3, kp)) for x in (q, k))
  v = _head_major(_pad_to(v, 3, vp))
  beta = _head_major(beta[..., None].astype(_F32))
  g = _chunk_cumsum(_head_major(g[..., None]), plan.chunk)
  st0 = _pad_to(_pad_to(jnp.swapaxes(s0, 2, 3), 2, vp), 3, kp)
  o, st = _MODULES[plan.impl].delta_rule_fwd(
      q, k, v, beta, _as_rows(beta, plan.chunk), g, _as_rows(g, plan.chunk),
      st0, chunk=plan.chunk, block_v=plan.block_v, interpret=plan.interpret)
  return _head_major(o)[..., :vdim], jnp.swapaxes(st, 2, 3)[:, :, :kdim, :vdim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _delta(q, k, v, beta, g, s0, plan):
  return _delta_kernel_forward(q, k, v, beta, g, s0, plan)


def _delta_fwd(q, k, v, beta, g, s0, plan):
  return _delta_kernel_forward(q, k, v, beta, g, s0, plan), (q, k, v, beta, g,
                                                              s0)


def _delta_bwd(plan, res, cts):
  """Backward by differentiating the XLA chunked algorithm (recomputed)."""
  _, vjp = jax.vjp(functools.partial(ref.delta_rule_chunked, chunk=plan.chunk),
                   *res)
  return vjp(cts)


_delta.defvjp(_delta_fwd, _delta_bwd)


@functools.partial(jax.jit, static_argnums=(6,))
def _delta_rule(q, k, v, beta, g, s0, plan: _ChunkPlan):
  t = q.shape[1]
  q, k, v, beta, g = _pad_time(plan.chunk, q, k, v, beta, g)
  if plan.impl == "xla":
    o, s = ref.delta_rule_chunked(q, k, v, beta, g, s0, chunk=plan.chunk)
  else:
    o, s = _delta(q, k, v, beta, g, s0, plan)
  return o[:, :t], s


def delta_rule(q: Array, k: Array, v: Array, beta: Array,
               log_decay: Optional[Array] = None, *,
               initial_state: Optional[Array] = None, chunk_size: int = 64,
               impl: str = "auto", interpret: Any = None,
               block_sizes: Optional[ChunkBlockSizes] = None
               ) -> tuple[Array, Array]:
  """DeltaNet / Gated DeltaNet, chunked (UT / WY form).

  S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
  o_t = q_t S_t (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length" and "Gated Delta
  Networks"). Keys are used as given: L2-normalise them for a contraction.
  beta may lie anywhere in [0, 2]; beta > 1 gives the transition a negative
  eigenvalue (Grazzi et al. 2024), which parity-style state tracking needs.

  The Pallas paths run a forward kernel per backend (one chunk per step:
  A, the unit-lower-triangular inverse by masked forward substitution, u,
  o, S). Their backward pass is NOT a kernel: it differentiates the XLA
  chunked algorithm, recomputed from the saved inputs.

  Args:
    q, k: [B, T, H, K]. v: [B, T, H, V]. beta: [B, T, H].
    log_decay: None or [B, T, H] (per head; <= 0).
    initial_state, chunk_size, impl, interpret, block_sizes: as in
      ``chunked_linear_attention`` (block_sizes.sub_chunk is unused).

  Returns:
    o [B, T, H, V] in the inputs' dtype and the final state [B, H, K, V]
    float32.
  """
  _check_qkv(q, k, v)
  if beta is None:
    raise ValueError("beta must be an array of shape [batch, seq, heads], "
                     "got None")
  _check_per_head("beta", beta, q)
  _check_per_head("log_decay", log_decay, q)
  _check_state(initial_state, q, v)
  plan = _chunk_plan("delta_rule", q, v, chunk_size, impl, interpret,
                     block_sizes, DELTA_RULE_FASTER)
  g = (jnp.zeros(q.shape[:3], _F32) if log_decay is None
       else log_decay.astype(_F32))
  s0 = (jnp.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:], _F32)
        if initial_state is None else initial_state.astype(_F32))
  return _delta_rule(q, k, v, beta, g, s0, plan)
