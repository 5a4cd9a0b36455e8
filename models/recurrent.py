"""What the recurrent families (``griffin``, ``linear_rnn``) share besides the
LM shell (``models.lm``, whose mixers they provide): the config fields every
recurrent family has, the short causal convolution, a per-head RMSNorm and
the scan ops run per shard of the active mesh.

RMSNorm multiplies by ``norm_offset + w`` (0 by default; 1 for checkpoints
whose norm weights start at 0, as RecurrentGemma) and the MLP has biases
with ``mlp_bias``: the fields ``gemkit.hf`` sets for imported checkpoints.

A recurrent mixer's ``decode`` continues from a fixed-size state (a recurrent
state, a short convolution's last inputs, a local-attention window), never a
cache that grows with the sequence. It resets its state at a packed segment
start (``positions == 0``), and the tokens at ``valid == False`` leave every
state unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Self, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from ops import scan


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecurrentLMConfig:
  """Hyper-parameters every recurrent family has (those ``lm.LM`` reads, and more).

  A family's config subclasses it with its mixer's fields, its ``family``
  name and the fields it adds to the range checks (``positive``: > 0,
  ``nonnegative``: >= 0). ``from_config`` reads a ``config.model`` block.
  ``mlp_dim`` 0: no MLP. ``logits_softcap`` c > 0: logits = c tanh(logits / c)
  (0: none). ``conv_width``: of the mixers' short causal convolution.
  ``embed_scale`` c: x_0 = c E[t] (0: sqrt(d_model)); ``norm_offset``: every
  RMSNorm multiplies by norm_offset + w; ``mlp_bias``: biases on the gated
  MLP's three projections (pretrained checkpoints; the defaults are gemkit's
  own models). Keyword-only, so a family's required fields may follow these
  defaults.
  """

  family: ClassVar[str]
  positive: ClassVar[tuple[str, ...]] = ()
  nonnegative: ClassVar[tuple[str, ...]] = ()

  vocab_size: int
  num_layers: int
  d_model: int
  mlp_dim: int
  conv_width: int = 4
  logits_softcap: float = 0.0
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  scan_impl: str = "auto"
  embed_scale: float = 0.0
  norm_offset: float = 0.0
  mlp_bias: bool = False

  def __post_init__(self):
    """``layers.FieldError`` (a ValueError) naming the first field out of its range."""
    for name in ("vocab_size", "num_layers", "d_model") + self.positive:
      if getattr(self, name) <= 0:
        raise layers.FieldError(name, f"must be > 0, got {getattr(self, name)}")
    for name in ("mlp_dim", "embed_scale") + self.nonnegative:
      if getattr(self, name) < 0:
        raise layers.FieldError(name, f"must be >= 0, got {getattr(self, name)}")

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any]) -> Self:
    """``cls(**model_cfg)`` without ``family``; unknown keys are a ValueError."""
    return layers.config_from(cls, model_cfg, cls.family)


class Conv1D(nnx.Module):
  """Causal depthwise convolution over time, within segments.

      y_t = bias + sum_{j < W} w_j * x_{t-j}

  where x_{t-j} counts only if it is in t's segment (zero before the start).
  ``state`` [B, W-1, D] holds the W-1 inputs before x when decoding (zeros at
  the start of a sequence).
  """

  def __init__(self, width: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.width, self.dtype = width, dtype
    self.kernel = layers.param(rngs, nnx.initializers.normal(width ** -0.5),
                               (width, features), param_dtype, (None, "mlp"))
    self.bias = layers.param(rngs, nnx.initializers.zeros, (features,), param_dtype,
                             ("mlp",))

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               state: jax.Array | None = None) -> jax.Array:
    B, T, D = x.shape
    W = self.width
    x = x.astype(self.dtype)
    prev = (jnp.zeros((B, W - 1, D), x.dtype) if state is None
            else state.astype(x.dtype))
    xs = jnp.concatenate([prev, x], axis=1)                # xs[W-1+t] = x_t
    w = self.kernel[...].astype(x.dtype)
    y = jnp.broadcast_to(self.bias[...].astype(x.dtype), x.shape)
    for j in range(W):
      shifted = xs[:, W - 1 - j:W - 1 - j + T]              # x_{t-j}
      if segment_ids is not None and j > 0:
        seg_prev = jnp.pad(segment_ids, ((0, 0), (j, 0)), constant_values=-1)[:, :T]
        shifted = jnp.where((seg_prev == segment_ids)[..., None], shifted, 0)
      y = y + shifted * w[j]
    return y

  def init_state(self, batch_size: int, features: int, dtype) -> jax.Array:
    return jnp.zeros((batch_size, self.width - 1, features), dtype)

  def next_state(self, x: jax.Array, state: jax.Array, num_valid: jax.Array) -> jax.Array:
    """The last W-1 inputs after the first ``num_valid`` [B] of x [B, Tn, D]."""
    xs = jnp.concatenate([state, x.astype(state.dtype)], axis=1)
    idx = num_valid[:, None] + jnp.arange(self.width - 1)[None]
    return jnp.take_along_axis(xs, idx[..., None], axis=1)


class HeadNorm(nnx.Module):
  """RMSNorm over the last axis of per-head outputs [..., H, V] (scale [V])."""

  def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = layers.param(rngs, nnx.initializers.ones, (features,), param_dtype, (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def linear_scan(a: jax.Array, b: jax.Array, h0: jax.Array | None, impl: str):
  """``ops.scan.linear_scan`` over channels a, b [B, T, D] (h0 [B, D] or None),
  per (batch, channel) shard of the active mesh when ``impl`` may run a
  Pallas kernel (``layers.kernel_op``). Returns (h [B, T, D], h_T [B, D])."""
  seq, state = ("batch", None, "mlp"), ("batch", "mlp")
  return layers.kernel_op(lambda a, b, h0: scan.linear_scan(a, b, h0=h0, impl=impl), impl,
                          (seq, seq, state), (seq, state))(a, b, h0)


def matrix_state_op(op: Callable[..., Any], impl: str, args: Sequence[jax.Array],
                    state: jax.Array | None, **kwargs):
  """``op(*args, initial_state=state, impl=impl, **kwargs)`` for a chunked
  matrix-state op (``chunked_linear_attention``, ``delta_rule``): args
  [B, T, H, ...], state [B, H, K, V] or None; per (batch, head) shard of the
  active mesh when ``impl`` may run a Pallas kernel. Returns
  (o [B, T, H, V], S_T [B, H, K, V])."""
  heads = lambda x: ("batch", None, "heads") + (None,) * (x.ndim - 3)
  state_names = ("batch", "heads", None, None)
  run = lambda *xs: op(*xs[:-1], initial_state=xs[-1], impl=impl, **kwargs)
  return layers.kernel_op(run, impl, [heads(x) for x in args] + [state_names],
                          (("batch", None, "heads", None), state_names))(*args, state)
