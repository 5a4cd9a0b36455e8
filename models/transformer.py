"""Decoder-only transformer LM (Llama/Gemma style) in Flax NNX.

    x_0   = sqrt(d) * E[tokens]
    x'_l  = x_l + Attn(RMSNorm(x_l))          (RoPE, grouped-query heads)
    x_l+1 = x'_l + SwiGLU(RMSNorm(x'_l))
    logits = RMSNorm(x_L) @ E^T               (or an untied head)

Packed training sequences carry ``segment_ids`` [B, T]: a token attends only
to earlier tokens of its own segment and RoPE positions restart at each
segment. ``decode`` runs the same layers incrementally against a
:class:`KVCache` (prefill with many tokens, then one token per step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models import layers

ATTENTION_PATTERNS = ("dense", "sliding")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters; ``from_config`` reads a ``config.model`` block."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention: str = "dense"
  window: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    if self.attention not in ATTENTION_PATTERNS:
      raise ValueError(f"attention must be one of {ATTENTION_PATTERNS}, "
                       f"got {self.attention!r}")
    if self.attention == "sliding" and self.window <= 0:
      raise ValueError(f"attention='sliding' needs window > 0, got {self.window}")

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any]) -> "TransformerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(model_cfg)
    values.pop("family", None)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown transformer config keys: {unknown}")
    return cls(**values)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer and the filled length of each sequence.

  k, v: [num_layers, B, max_len, num_kv_heads, head_dim]; lengths: [B] int32.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
                   k_seg: jax.Array, window: int = 0) -> jax.Array:
  """Boolean [B, 1, T, S]: causal, same segment and, if window > 0, i - j < window."""
  mask = (q_pos[:, :, None] >= k_pos[:, None, :]) & (q_seg[:, :, None] == k_seg[:, None, :])
  if window > 0:
    mask &= q_pos[:, :, None] - k_pos[:, None, :] < window
  return mask[:, None]


class Attention(nnx.Module):
  """Multi-head attention with grouped-query K/V heads and RoPE."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.cfg = cfg
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = layers.Dense(cfg.d_model, h * hd, names=("embed", "heads"), **kw)
    self.k_proj = layers.Dense(cfg.d_model, kvh * hd, names=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Dense(cfg.d_model, kvh * hd, names=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Dense(h * hd, cfg.d_model, names=("heads", "embed"), **kw)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    B, T, _ = x.shape
    cfg = self.cfg
    q = self.q_proj(x).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    q = layers.apply_rope(q, positions, cfg.rope_theta)
    k = layers.apply_rope(k, positions, cfg.rope_theta)
    return (layers.constrain(q, ("batch", "seq", "heads", None)),
            layers.constrain(k, ("batch", "seq", "kv_heads", None)), v)

  def _out(self, o: jax.Array) -> jax.Array:
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, -1))

  @property
  def _window(self) -> int:
    return self.cfg.window if self.cfg.attention == "sliding" else 0

  def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    q, k, v = self._qkv(x, positions)
    idx = jnp.broadcast_to(jnp.arange(x.shape[1]), segment_ids.shape)
    mask = attention_mask(idx, idx, segment_ids, segment_ids, self._window)
    return self._out(jax.nn.dot_product_attention(q, k, v, mask=mask))

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             lengths: jax.Array):
    """Attends new tokens x [B, Tn, d] at positions lengths + i to cache and themselves.

    Returns (out [B, Tn, d], k_cache, v_cache) with the new keys/values written
    at positions lengths .. lengths + Tn - 1 of each sequence.
    """
    B, Tn, _ = x.shape
    positions = lengths[:, None] + jnp.arange(Tn)[None]
    q, k, v = self._qkv(x, positions)
    write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))
    k_cache = write(k_cache, k.astype(k_cache.dtype), lengths)
    v_cache = write(v_cache, v.astype(v_cache.dtype), lengths)
    k_pos = jnp.broadcast_to(jnp.arange(k_cache.shape[1]), (B, k_cache.shape[1]))
    ones = jnp.ones_like
    mask = attention_mask(positions, k_pos, ones(positions), ones(k_pos), self._window)
    o = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                                     mask=mask)
    return self._out(o), k_cache, v_cache


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, **kw)
    self.mlp = layers.GatedMLP(cfg.d_model, cfg.mlp_dim, **kw)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x, segment_ids, positions, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    x = x + drop(self.attn(self.attn_norm(x), segment_ids, positions))
    x = x + drop(self.mlp(self.mlp_norm(x)))
    return layers.constrain(x, ("batch", "seq", "embed"))

  def decode(self, x, k_cache, v_cache, lengths):
    h, k_cache, v_cache = self.attn.decode(self.attn_norm(x), k_cache, v_cache, lengths)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache


class Transformer(nnx.Module):
  """The LM: ``__call__`` for training, ``init_cache`` + ``decode`` for sampling."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.cfg = cfg
    self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, **kw)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, **kw)
    self.head = (None if cfg.tie_embeddings else
                 layers.Dense(cfg.d_model, cfg.vocab_size, names=("embed", "vocab"),
                              rngs=rngs, **kw))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] float32.

    segment_ids [B, T] (default: one segment) separate packed documents.
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

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    cfg = self.cfg
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch_size,), jnp.int32))

  def decode(self, tokens: jax.Array, cache: KVCache,
             num_valid: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Appends tokens [B, Tn] to the cache; returns their logits [B, Tn, vocab].

    ``num_valid`` [B] (default Tn) is how many of the Tn tokens are real for
    each sequence (ragged right-padded prompts): lengths advance by it and the
    padding's cache entries are overwritten by the next call. The caller keeps
    lengths + Tn <= cache.max_len.
    """
    if num_valid is None:
      num_valid = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    x = self.embed(tokens)
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block.decode(x, cache.k[i], cache.v[i], cache.lengths)
      ks.append(k)
      vs.append(v)
    cache = KVCache(jnp.stack(ks), jnp.stack(vs), cache.lengths + num_valid.astype(jnp.int32))
    return self._logits(x), cache
