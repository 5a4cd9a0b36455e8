"""The shell shared by the recurrent families (``griffin``, ``linear_rnn``).

    x_0   = c * E[tokens]                  (c = embed_scale, default sqrt(d))
    x'_l  = x_l + Mix_l(RMSNorm(x_l))      (a temporal mixer: RG-LRU, local
                                           attention, GLA, DeltaNet, ...)
    x_l+1 = x'_l + MLP(RMSNorm(x'_l))      (gated MLP; skipped if mlp_dim = 0)
    logits = softcap(RMSNorm(x_L) @ E^T)

RMSNorm multiplies by ``norm_offset + w`` (0 by default; 1 for checkpoints
whose norm weights start at 0, as RecurrentGemma) and the MLP has biases
with ``mlp_bias``: the fields ``gemkit.hf`` sets for imported checkpoints.

A temporal mixer is an ``nnx.Module`` with

    __call__(x [B, T, d], segment_ids [B, T], positions [B, T]) -> [B, T, d]
    init_cache(batch_size, max_len, dtype) -> dict of arrays
    decode(x [B, Tn, d], cache, lengths [B], valid [B, Tn] bool) -> (y, cache)

and ``decode`` continues from a fixed-size state (a recurrent state, a short
convolution's last inputs, a local-attention window), never a cache that grows
with the sequence. Positions restart at 0 at every packed segment start; a
mixer resets its state there (``positions == 0``), so a packed document never
sees the one before it. In ``decode`` the tokens at ``valid == False`` (the
right padding of a ragged prompt) leave every state unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Self, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from ops import scan


@flax.struct.dataclass
class RecurrentCache:
  """Per-layer mixer states (a tuple of dicts of arrays) and the tokens consumed [B]."""

  layers: tuple
  lengths: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecurrentLMConfig:
  """Hyper-parameters every recurrent family has (those ``RecurrentLM`` reads).

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


class Block(nnx.Module):
  """Pre-norm residual block: temporal mixer, then (optionally) the gated MLP."""

  def __init__(self, cfg: RecurrentLMConfig, mixer: nnx.Module, *, rngs: nnx.Rngs,
               mlp_activation: Callable[[jax.Array], jax.Array]):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    norm = lambda: layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=cfg.norm_offset, **kw)
    self.mix_norm = norm()
    self.mixer = mixer
    self.mlp_norm = norm() if cfg.mlp_dim else None
    self.mlp = (layers.GatedMLP(cfg.d_model, cfg.mlp_dim, activation=mlp_activation,
                                use_bias=cfg.mlp_bias, **kw)
                if cfg.mlp_dim else None)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x, segment_ids, positions, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    x = x + drop(self.mixer(self.mix_norm(x), segment_ids, positions))
    if self.mlp is not None:
      x = x + drop(self.mlp(self.mlp_norm(x)))
    return layers.constrain(x, ("batch", "seq", "embed"))

  def decode(self, x, cache, lengths, valid):
    h, cache = self.mixer.decode(self.mix_norm(x), cache, lengths, valid)
    x = x + h
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x))
    return x, cache


class RecurrentLM(nnx.Module):
  """Embedding, residual blocks around the given mixers, final norm, logits.

  ``__call__`` for training (same signature as ``Transformer``), and
  ``init_cache`` + ``decode`` for sampling, so ``gemkit.sample`` drives it
  unchanged. ``cfg`` is a family's ``RecurrentLMConfig``.
  """

  def __init__(self, cfg: RecurrentLMConfig, mixers: Sequence[nnx.Module], *, rngs: nnx.Rngs,
               mlp_activation: Callable[[jax.Array], jax.Array] = jax.nn.silu):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.cfg = cfg
    self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                              scale=cfg.embed_scale or None, **kw)
    self.blocks = nnx.List([Block(cfg, m, rngs=rngs, mlp_activation=mlp_activation)
                            for m in mixers])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=cfg.norm_offset,
                                     rngs=rngs, **kw)
    self.head = (None if cfg.tie_embeddings else
                 layers.Dense(cfg.d_model, cfg.vocab_size, names=("embed", "vocab"),
                              rngs=rngs, **kw))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    logits = (self.embed.attend(x) if self.head is None else self.head(x)).astype(jnp.float32)
    return layers.softcap(logits, self.cfg.logits_softcap)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] float32.

    segment_ids [B, T] (default: one segment) separate packed documents: every
    mixer's state restarts at a segment start.
    """
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    positions = layers.segment_positions(segment_ids)
    x = layers.constrain(self.embed(tokens), ("batch", "seq", "embed"))

    def run(block, x, rngs):
      return block(x, segment_ids, positions, deterministic=deterministic, rngs=rngs)

    if self.cfg.remat:
      run = nnx.remat(run)
    for block in self.blocks:
      x = run(block, x, rngs)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> RecurrentCache:
    """Zero states; their size does not grow with ``max_len`` (a local attention
    window holds min(window, max_len) keys)."""
    dtype = dtype or jnp.dtype(self.cfg.dtype)
    return RecurrentCache(
        tuple(b.mixer.init_cache(batch_size, max_len, dtype) for b in self.blocks),
        jnp.zeros((batch_size,), jnp.int32))

  def decode(self, tokens: jax.Array, cache: RecurrentCache,
             num_valid: jax.Array | None = None) -> tuple[jax.Array, RecurrentCache]:
    """Continues from ``cache`` with tokens [B, Tn]; returns their logits [B, Tn, vocab].

    ``num_valid`` [B] (default Tn): how many of the Tn tokens are real for each
    sequence (a ragged, right-padded prompt); the rest change no state.
    """
    Tn = tokens.shape[1]
    if num_valid is None:
      num_valid = jnp.full(tokens.shape[:1], Tn, jnp.int32)
    num_valid = num_valid.astype(jnp.int32)
    valid = jnp.arange(Tn)[None] < num_valid[:, None]
    x = self.embed(tokens)
    states = []
    for block, state in zip(self.blocks, cache.layers):
      x, state = block.decode(x, state, cache.lengths, valid)
      states.append(state)
    return self._logits(x), RecurrentCache(tuple(states), cache.lengths + num_valid)


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
