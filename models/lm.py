"""The language-model shell every family shares: embedding, residual blocks
around a temporal mixer, final norm, logits, and the decode cache.

    x_0    = c * E[tokens]                     (c = embed_scale, default sqrt(d))
    x'_l   = x_l + P(Mix_l(RMSNorm(x_l)))      (attention, RG-LRU, GLA, DeltaNet, ...)
    x_l+1  = x'_l + P'(MLP(RMSNorm(x'_l)))     (gated MLP; skipped if mlp_dim = 0)
    logits = softcap(RMSNorm(x_L) @ E^T)       (or an untied head)

P, P' are RMSNorms with ``post_norms`` (Gemma 2), else the identity.

A mixer is an ``nnx.Module`` with

    __call__(x [B, T, d], segment_ids [B, T], positions [B, T], *, train) -> [B, T, d]
    init_cache(batch_size, max_len, dtype) -> its decode state (a dict of arrays)
    decode(x [B, Tn, d], state, lengths [B], valid [B, Tn] bool) -> (y, state)

``positions`` restart at 0 at every packed segment start (a mixer keeps a
packed document from seeing the one before it); ``train`` is True in training
steps (S2 attention is on only then). ``decode`` continues from the state
after ``lengths`` tokens with new tokens at positions lengths, lengths + 1,
...; the tokens at ``valid == False`` (the right padding of a ragged prompt)
must not change what later tokens see. The state is a KV cache for
``transformer.Attention`` and a fixed-size state (a recurrent state, a short
convolution's last inputs, a local-attention window) for the recurrent mixers.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models import layers


@flax.struct.dataclass
class Cache:
  """Per-layer mixer states (a tuple, one per block) and the tokens consumed [B] int32."""

  layers: tuple
  lengths: jax.Array


def _norm(cfg, rngs: nnx.Rngs) -> layers.RMSNorm:
  return layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=cfg.norm_offset,
                        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                        rngs=rngs)


class Block(nnx.Module):
  """Pre-norm residual block: the mixer, then (``mlp_dim`` > 0) the gated MLP.

  ``names``: the attributes (parameter paths) of the mixer's norm and the
  mixer, ``("attn_norm", "attn")`` in the transformer; its post norm is
  ``"post_" + names[0]``, the MLP's ``mlp_norm``, ``mlp``, ``post_mlp_norm``.
  """

  def __init__(self, cfg, mixer: Callable[[], nnx.Module], *, rngs: nnx.Rngs,
               names: tuple[str, str], mlp_activation: Callable[[jax.Array], jax.Array],
               post_norms: bool):
    self.names = names
    setattr(self, names[0], _norm(cfg, rngs))
    setattr(self, names[1], mixer())
    self.mlp_norm = _norm(cfg, rngs) if cfg.mlp_dim else None
    self.mlp = (layers.GatedMLP(cfg.d_model, cfg.mlp_dim, activation=mlp_activation,
                                use_bias=cfg.mlp_bias, dtype=jnp.dtype(cfg.dtype),
                                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
                if cfg.mlp_dim else None)
    setattr(self, "post_" + names[0], _norm(cfg, rngs) if post_norms else None)
    self.post_mlp_norm = _norm(cfg, rngs) if post_norms and cfg.mlp_dim else None
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def _parts(self):
    """(norm, mixer, post norm or None) of the mixer branch."""
    norm, mixer = self.names
    return getattr(self, norm), getattr(self, mixer), getattr(self, "post_" + norm)

  @staticmethod
  def _post(norm: layers.RMSNorm | None, y: jax.Array) -> jax.Array:
    return y if norm is None else norm(y)

  def _mlp(self, x: jax.Array) -> jax.Array:
    return self._post(self.post_mlp_norm, self.mlp(self.mlp_norm(x)))

  def __call__(self, x, segment_ids, positions, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, train: bool = False):
    drop = lambda h: self.dropout(h, deterministic=deterministic, rngs=rngs)
    norm, mixer, post = self._parts()
    x = x + drop(self._post(post, mixer(norm(x), segment_ids, positions, train=train)))
    if self.mlp is not None:
      x = x + drop(self._mlp(x))
    return layers.constrain(x, ("batch", "seq", "embed"))

  def init_cache(self, batch_size: int, max_len: int, dtype):
    return self._parts()[1].init_cache(batch_size, max_len, dtype)

  def decode(self, x, state, lengths, valid):
    norm, mixer, post = self._parts()
    h, state = mixer.decode(norm(x), state, lengths, valid)
    x = x + self._post(post, h)
    return (x if self.mlp is None else x + self._mlp(x)), state


class LM(nnx.Module):
  """Embedding, residual blocks around the mixers, final norm and logits.

  ``__call__`` for training and scoring, ``init_cache`` + ``decode`` for
  sampling (``gemkit.sample``). ``cfg`` is a family's config; the shell reads
  vocab_size, num_layers, d_model, mlp_dim, mlp_bias, embed_scale, norm_eps,
  norm_offset, tie_embeddings, logits_softcap, dropout_rate, remat, dtype and
  param_dtype. ``mixer(i)`` builds (or returns) layer i's mixer; it is called
  after the embedding and layer i's first norm are initialised.
  """

  def __init__(self, cfg, mixer: Callable[[int], nnx.Module], *, rngs: nnx.Rngs,
               names: tuple[str, str] = ("mix_norm", "mixer"),
               mlp_activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
               post_norms: bool = False):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.cfg = cfg
    self.embed = layers.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                              scale=cfg.embed_scale or None, **kw)
    self.blocks = nnx.List([
        Block(cfg, functools.partial(mixer, i), rngs=rngs, names=names,
              mlp_activation=mlp_activation, post_norms=post_norms)
        for i in range(cfg.num_layers)])
    self.final_norm = _norm(cfg, rngs)
    self.head = (None if cfg.tie_embeddings else
                 layers.Dense(cfg.d_model, cfg.vocab_size, names=("embed", "vocab"),
                              rngs=rngs, **kw))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    logits = (self.embed.attend(x) if self.head is None else self.head(x)).astype(jnp.float32)
    return layers.softcap(logits, self.cfg.logits_softcap)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               train: bool | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] float32.

    segment_ids [B, T] (default: one segment) separate packed documents.
    ``train`` defaults to whether ``rngs`` are given: ``gemkit.train`` passes
    its dropout keys to every training step, evaluation and sampling pass none.
    """
    train = rngs is not None if train is None else train
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    positions = layers.segment_positions(segment_ids)
    x = layers.constrain(self.embed(tokens), ("batch", "seq", "embed"))

    def run(block, x, rngs):
      return block(x, segment_ids, positions, deterministic=deterministic, rngs=rngs,
                   train=train)

    if self.cfg.remat:
      run = nnx.remat(run)
    for block in self.blocks:
      x = run(block, x, rngs)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
    """Empty states for sequences of up to ``max_len`` tokens (``dtype``: of
    the cached activations, default the config's)."""
    dtype = dtype or jnp.dtype(self.cfg.dtype)
    return Cache(tuple(b.init_cache(batch_size, max_len, dtype) for b in self.blocks),
                 jnp.zeros((batch_size,), jnp.int32))

  def decode(self, tokens: jax.Array, cache: Cache,
             num_valid: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Continues from ``cache`` with tokens [B, Tn]; returns their logits [B, Tn, vocab].

    ``num_valid`` [B] (default Tn): how many of the Tn tokens are real for each
    sequence (a ragged, right-padded prompt); lengths advance by it. The caller
    keeps lengths + Tn <= the cache's ``max_len``.
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
    return self._logits(x), Cache(tuple(states), cache.lengths + num_valid)
