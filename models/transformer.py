"""Decoder-only transformer LM (Llama/Gemma style) in Flax NNX: the LM shell
(``models.lm``) with attention as the mixer of every layer.

    x_0   = c * E[tokens]                     (c = embed_scale, default sqrt(d))
    x'_l  = x_l + Attn(RMSNorm(x_l))          (RoPE, grouped-query heads)
    x_l+1 = x'_l + GLU(RMSNorm(x'_l))         (SwiGLU; GeGLU with gelu_tanh)
    logits = RMSNorm(x_L) @ E^T               (or an untied head)

The config fields cover the pretrained families that ``gemkit.hf`` imports
(one model class for all of them):

  Llama 2/3   embed_scale=1, untied or tied head, ``rope_type`` "llama3"
              (Llama 3.1's frequency scaling) or "linear", any ``head_dim``;
              ``qkv_bias`` / ``out_bias`` / ``mlp_bias`` (attention_bias).
  Mistral     attention="sliding" with ``window``.
  Qwen2       ``qkv_bias``.          Qwen3   ``qk_norm``: RMSNorm over each
                                              head's q and k before RoPE.
  Gemma       ``norm_offset``=1 (RMSNorm weight w multiplies as 1 + w),
              ``mlp_activation``="gelu_tanh", embed_scale sqrt(d).
  Gemma 2     plus ``post_norms`` (RMSNorm on the attention and MLP outputs
              before each residual add), ``attn_softcap`` (s -> c tanh(s / c)
              on the attention logits), ``logits_softcap`` (the same on the
              output logits), ``attn_scale`` = query_pre_attn_scalar^-1/2,
              and ``layer_pattern`` "LG": layer l uses sliding-window attention
              when ``layer_pattern[l % len]`` is "L" and the ``attention``
              pattern when it is "G".

Packed training sequences carry ``segment_ids`` [B, T]: a token attends only
to earlier tokens of its own segment and RoPE positions restart at each
segment. ``decode`` runs the same layers incrementally against the keys and
values of every layer (``init_cache``; prefill with many tokens, then one
token per step).

The attention pattern comes from ``config.model.attention`` (query i, key j,
positions in the packed row, always causal and within the segment):

  dense    every j <= i; ``jax.nn.dot_product_attention`` (the baseline).
  sliding  i - j < window (Mistral, Griffin's local attention).
  s2       LongLoRA's shifted sparse attention (Chen et al. 2023): groups of
           ``s2_group`` tokens, half of the heads shifted by half a group;
           in training only, dense at inference (as LongLoRA).
  topk     per query block of ``query_block`` rows (default ``block_size``),
           the ``top_k`` best kv blocks of ``block_size``, plus
           ``local_blocks`` and ``sink_blocks`` (MoBA / NSA selection /
           Quest). ``topk_scores`` ranks blocks by the block-mean key against
           the block-mean query ("mean", MoBA), by Quest's bound on each
           query's score in the block ("quest", the criterion decode uses),
           or by the probabilities of NSA's compressed branch
           ("compressed"). ``compressed_branch`` adds that branch's output
           (:func:`compressed_attention`) through a sigmoid gate.
  global   i - j < window or j < global_tokens (sink / global tokens:
           StreamingLLM, Longformer).

All but dense run ``ops.attention.block_sparse_attention`` /
``topk_block_attention``, which skip the empty blocks. Positions are those
of the packed row, so with several documents in a row only the row's first
tokens / blocks are sinks and S2 groups and top-k blocks are aligned to the
row (one document per row, as in long-context training, and decoding use
the document's own positions). A decode step (one new token) runs
``ops.attention.decode_attention`` on the cache (Quest page selection for
topk, whatever ``topk_scores``, plus the compressed branch's output if on;
the gathered window and sinks for sliding / global); a prefill (several new
tokens) runs the training attention over the cache. Decode equals the
forward pass for every pattern except the top-k selection, which in the
forward pass scores a block by all the queries of a query block (later ones
included) and at a decode step by the one new query.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers, lm
from ops import attention as attention_ops
from ops import common

# pattern -> {config key: smallest value the pattern needs}
PATTERN_KEYS = {"dense": {}, "sliding": {"window": 1}, "s2": {"s2_group": 2},
                "topk": {"top_k": 1}, "global": {"window": 1, "global_tokens": 1}}
PATTERN_FIELDS = ("attention", "window", "block_size", "top_k", "local_blocks", "sink_blocks",
                  "topk_scores", "compressed_branch", "query_block", "s2_group",
                  "global_tokens")
ATTENTION_PATTERNS = tuple(PATTERN_KEYS)
TOPK_SCORES = ("mean", "quest", "compressed")


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
  block_size: int = 128         # blocks of the block-sparse patterns (and decode pages)
  top_k: int = 0                # topk: selected kv blocks per query block
  local_blocks: int = 1         # topk: kv blocks ending at the query block, always kept
  sink_blocks: int = 1          # topk: first kv blocks, always kept
  topk_scores: str = "mean"     # topk: rank blocks by "mean" keys, "quest" bounds, "compressed"
  compressed_branch: bool = False  # topk: add NSA's gated compressed-attention output
  query_block: int = 0          # topk: query rows sharing a selection (0: block_size)
  s2_group: int = 0             # s2: group size G
  global_tokens: int = 0        # global: first tokens seen by (and seeing) all
  attention_impl: str = "auto"  # ops.attention impl: auto | xla | pallas_tpu | pallas_gpu
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # Pretrained architectures (module docstring); the defaults are gemkit's own models.
  embed_scale: float = 0.0      # x_0 = embed_scale * E[t]; 0: sqrt(d_model)
  norm_offset: float = 0.0      # RMSNorm multiplies by norm_offset + w (Gemma: 1)
  mlp_activation: str = "silu"  # silu | gelu_tanh | gelu (layers.ACTIVATIONS)
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False         # Qwen3: RMSNorm over head_dim of q and k
  post_norms: bool = False      # Gemma 2: RMSNorm of the attention / MLP output
  attn_scale: float = 0.0       # attention logit scale; 0: head_dim^-1/2
  attn_softcap: float = 0.0     # c tanh(s / c) on attention logits; 0: none
  logits_softcap: float = 0.0   # the same on the output logits; 0: none
  layer_pattern: str = ""       # "L" sliding (window) / "G" `attention`, cyclic; "": all G
  rope_type: str = "default"    # default | linear | llama3 (layers.rope_frequencies)
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  rope_fraction: float = 1.0    # rotated fraction of head_dim (recurrentgemma: 0.5)

  def __post_init__(self):
    """``layers.FieldError`` (a ValueError) naming the first field that cannot work.

    ``gemkit.config.validate`` reports it as ``config error: model.<field>: ...``.
    """
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise layers.FieldError(name, f"must be > 0, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise layers.FieldError("num_kv_heads", f"must divide num_heads={self.num_heads}, "
                              f"got {self.num_kv_heads}")
    if set(self.layer_pattern) - set("LG"):
      raise layers.FieldError("layer_pattern", "must be a string of L (sliding) and G (the "
                              f"attention pattern), got {self.layer_pattern!r}")
    if "L" in self.layer_pattern and self.window < 1:
      raise layers.FieldError("window", f"must be >= 1 with layer_pattern="
                              f"{self.layer_pattern!r} (sliding layers), got {self.window}")
    layers.activation(self.mlp_activation)
    if not 0 < self.rope_fraction <= 1:
      raise layers.FieldError("rope_fraction", f"must be in (0, 1], got {self.rope_fraction}")
    rot = self.head_dim * self.rope_fraction
    if rot != int(rot) or int(rot) % 2:
      if self.rope_fraction == 1:
        raise layers.FieldError("head_dim", f"must be even for RoPE, got {self.head_dim}")
      raise layers.FieldError("rope_fraction", "must rotate an even number of the "
                              f"head_dim={self.head_dim} dims, got {self.rope_fraction}")
    self.inv_freq()
    if self.attention not in ATTENTION_PATTERNS:
      raise layers.FieldError("attention", f"must be one of {ATTENTION_PATTERNS}, "
                              f"got {self.attention!r}")
    for key, least in PATTERN_KEYS[self.attention].items():
      if getattr(self, key) < least:
        raise layers.FieldError(key, f"must be >= {least} with attention={self.attention!r}, "
                                f"got {getattr(self, key)}")
    if self.topk_scores not in TOPK_SCORES:
      raise layers.FieldError("topk_scores", f"must be one of {TOPK_SCORES}, "
                              f"got {self.topk_scores!r}")
    if self.topk_scores == "compressed" and not self.compressed_branch:
      raise layers.FieldError("compressed_branch", "must be True with topk_scores='compressed' "
                              "(the branch computes the scores)")
    if self.block_size < 1:
      raise layers.FieldError("block_size", f"must be >= 1, got {self.block_size}")
    for name in ("local_blocks", "sink_blocks", "query_block"):
      if getattr(self, name) < 0:
        raise layers.FieldError(name, f"must be >= 0, got {getattr(self, name)}")

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any]) -> "TransformerConfig":
    return layers.config_from(cls, model_cfg, "transformer")

  def inv_freq(self):
    """RoPE's inverse frequencies [rotated dims / 2] (``layers.rope_frequencies``)."""
    return layers.rope_frequencies(
        int(self.head_dim * self.rope_fraction), self.rope_theta, self.rope_type,
        factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
        high_freq_factor=self.rope_high_freq_factor,
        original_max_len=self.rope_original_max_len)

  def layer(self, index: int) -> "TransformerConfig":
    """The config of layer ``index``: ``attention="sliding"`` on an "L" of
    ``layer_pattern``, this config otherwise."""
    p = self.layer_pattern
    if p and p[index % len(p)] == "L":
      return dataclasses.replace(self, attention="sliding", layer_pattern="")
    return self


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
                   k_seg: jax.Array, window: int = 0) -> jax.Array:
  """Boolean [B, 1, T, S]: causal, same segment and, if window > 0, i - j < window."""
  mask = (q_pos[:, :, None] >= k_pos[:, None, :]) & (q_seg[:, :, None] == k_seg[:, None, :])
  if window > 0:
    mask &= q_pos[:, :, None] - k_pos[:, None, :] < window
  return mask[:, None]


def pattern_mask(cfg: TransformerConfig, train: bool = True) -> attention_ops.Mask | None:
  """The ``ops.attention`` mask of a static pattern; None for dense attention
  (also S2 outside training) and for top-k (its blocks depend on the data)."""
  causal = attention_ops.CausalMask()
  if cfg.attention == "sliding":
    return causal & attention_ops.LocalMask(cfg.window)
  if cfg.attention == "global":
    return causal & (attention_ops.LocalMask(cfg.window)
                     | attention_ops.GlobalTokensMask(cfg.global_tokens))
  if cfg.attention == "s2" and train:
    return causal & attention_ops.ShiftedGroupMask(cfg.s2_group)
  return None


def compressed_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                         block: int, q_seg: jax.Array | None = None,
                         kv_seg: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """NSA's compressed attention branch with mean pooling (Yuan et al. 2025, eq. 7).

  Each complete block c of ``block`` keys (positions c*block .. (c+1)*block - 1)
  becomes one key and value, ``kbar_c = mean k``, ``vbar_c = mean v``; query i
  attends to the blocks that end at or before its position (and lie inside
  its segment)::

    p_ic = softmax_c(<q_i, kbar_c> / sqrt(D)),   o_i = sum_c p_ic vbar_c

  (``o_i = 0`` when no block is complete yet). NSA compresses a block with a
  learned MLP over overlapping, position-encoded blocks and gives each branch
  its own keys; here the branch pools the attention's own (RoPE) keys, so the
  gradient that trains it also shapes the keys the selection ranks.

  Args:
    q: ``[B, T, Hq, D]`` at positions ``q_pos`` ``[B, T]``; k, v:
      ``[B, S, Hkv, D]`` at positions 0..S-1.
    block: the block size.
    q_seg, kv_seg: ``[B, T]`` and ``[B, S]`` segment ids, or None.

  Returns:
    ``o`` ``[B, T, Hq, D]`` and the selection scores ``[B, T, Hkv,
    ceil(S / block)]``: ``p`` summed over the query heads of each kv head
    (NSA shares the selection across a GQA group), 0 for an incomplete block.
  """
  B, T, hq, D = q.shape
  S, hkv = k.shape[1], k.shape[2]
  nc = S // block
  pool = lambda x: x[:, :nc * block].reshape(B, nc, block, hkv, D).astype(jnp.float32).mean(2)
  kbar, vbar = pool(k), pool(v)
  logits = jnp.einsum("btgrd,bcgd->btgrc", q.reshape(B, T, hkv, hq // hkv, D), kbar,
                      preferred_element_type=jnp.float32) * D ** -0.5
  ok = ((jnp.arange(nc) + 1) * block - 1)[None, None] <= q_pos[:, :, None]      # [B, T, nc]
  if q_seg is not None:
    blk = kv_seg[:, :nc * block].reshape(B, nc, block)
    ok &= ((blk.min(-1) == blk.max(-1))[:, None] & (blk[:, None, :, 0] == q_seg[:, :, None]))
  ok = ok[:, :, None, None]
  logits = jnp.where(ok, logits, -jnp.inf)
  top = jnp.max(logits, -1, keepdims=True)
  e = jnp.where(ok, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  p = e / jnp.maximum(e.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
  o = jnp.einsum("btgrc,bcgd->btgrd", p, vbar).reshape(B, T, hq, D).astype(q.dtype)
  scores = jnp.pad(p.sum(3), ((0, 0), (0, 0), (0, 0), (0, -(-S // block) - nc)))
  return o, scores


def _gather_keys(cache: jax.Array, index: jax.Array) -> jax.Array:
  """cache [B, S, H, D], index [B, N] (clipped to S - 1) -> [B, N, H, D]."""
  index = jnp.clip(index, 0, cache.shape[1] - 1)
  return jnp.take_along_axis(cache, index[:, :, None, None], axis=1)


def _per_shard(op, q, k, v, rows: jax.Array | None, *, impl: str, split_heads: bool = True,
               single_query: bool = False, scores: jax.Array | None = None) -> jax.Array:
  """``op(q, k, v, rows[, scores])``, per (batch, head) shard of the active mesh when
  ``impl`` may run a Pallas kernel (``layers.kernel_op``): the kernel sees
  whole sequences of its rows and heads, and no input is gathered.
  q [B, T, Hq, D] ([B, Hq, D] for ``op`` and the result when
  ``single_query``), k/v [B, S, Hkv, D], ``rows`` [B, ...] per-row data
  (segment ids, lengths) or None; ``scores`` [B, T, Hkv, N] (top-k block
  scores per kv head) or None, split like k. When the tensor axis does not
  divide Hkv (a GQA group would span shards) each query head gets its own
  copy of its kv head (and of its scores)."""
  if single_query:
    return _per_shard(lambda q, k, v, r: op(q[:, 0], k, v, r)[:, None], q[:, None], k, v,
                      rows, impl=impl, split_heads=split_heads)[:, 0]
  heads = "heads" if split_heads else None
  if (split_heads and common.may_use_kernel(impl)
      and k.shape[2] % layers.mesh_shards("kv_heads")):
    rep = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, rep, axis=2) for x in (k, v))
    scores = None if scores is None else jnp.repeat(scores, rep, axis=2)
  q_names, kv_names = ("batch", None, heads, None), ("batch", None, heads and "kv_heads", None)
  row_names = None if rows is None else ("batch",) + (None,) * (rows.ndim - 1)
  args, names = (q, k, v, rows), (q_names, kv_names, kv_names, row_names)
  if scores is not None:
    args, names = args + (scores,), names + (kv_names,)
  return layers.kernel_op(op, impl, names, q_names)(*args)


class Attention(nnx.Module):
  """Multi-head attention with grouped-query K/V heads, RoPE and the config's pattern."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.cfg = cfg
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = dict(use_bias=cfg.qkv_bias, **kw)
    self.q_proj = layers.Dense(cfg.d_model, h * hd, names=("embed", "heads"), **qkv)
    self.k_proj = layers.Dense(cfg.d_model, kvh * hd, names=("embed", "kv_heads"), **qkv)
    self.v_proj = layers.Dense(cfg.d_model, kvh * hd, names=("embed", "kv_heads"), **qkv)
    self.o_proj = layers.Dense(h * hd, cfg.d_model, names=("heads", "embed"),
                               use_bias=cfg.out_bias, **kw)
    norm = lambda: layers.RMSNorm(hd, eps=cfg.norm_eps, offset=cfg.norm_offset, names=(None,),
                                  **kw)
    self.q_norm, self.k_norm = (norm(), norm()) if cfg.qk_norm else (None, None)
    self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
    self.softcap = cfg.attn_softcap or None
    # NSA's gate of the compressed branch, g = sigmoid(x W + b) per head (0.5 at init).
    self.cmp_gate = (layers.Dense(cfg.d_model, h, names=("embed", "heads"), use_bias=True,
                                  kernel_init=nnx.initializers.zeros, **kw)
                     if self.compressed else None)

  @property
  def compressed(self) -> bool:
    return self.cfg.attention == "topk" and self.cfg.compressed_branch

  def _qkv(self, x: jax.Array, positions: jax.Array):
    B, T, _ = x.shape
    cfg = self.cfg
    q, k, v = layers.fused_dense(x, self.q_proj, self.k_proj, self.v_proj)
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = cfg.inv_freq()     # numpy, at trace time: not a model variable
    q = layers.apply_rope(q, positions, inv_freq=inv_freq)
    k = layers.apply_rope(k, positions, inv_freq=inv_freq)
    return (layers.constrain(q, ("batch", "seq", "heads", None)),
            layers.constrain(k, ("batch", "seq", "kv_heads", None)), v)

  def _out(self, o: jax.Array) -> jax.Array:
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, -1))

  def dense(self, q, k, v, mask: jax.Array | None = None) -> jax.Array:
    """Dense attention with this layer's scale and soft-cap: q [B, T, Hq, D],
    k/v [B, S, Hkv, D], ``mask`` [B, 1, T, S] bool, or None for causal (T == S).

    ``jax.nn.dot_product_attention`` without a soft-cap; with one (Gemma 2),
    written out: it has no soft-cap argument."""
    if self.softcap is None:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale,
                                          is_causal=mask is None)
    B, T, hq, D = q.shape
    S, hkv = k.shape[1], k.shape[2]
    if mask is None:
      mask = jnp.tril(jnp.ones((T, S), bool))[None, None]
    s = jnp.einsum("btgrd,bsgd->bgrts", q.reshape(B, T, hkv, hq // hkv, D), k,
                   preferred_element_type=jnp.float32) * self.scale
    s = self.softcap * jnp.tanh(s / self.softcap)
    s = jnp.where(mask[:, :, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", p, v).reshape(B, T, hq, D)

  def attend(self, q, k, v, segment_ids: jax.Array | None, train: bool = False,
             gate: jax.Array | None = None) -> jax.Array:
    """The pattern's causal attention, q [B, T, Hq, D], k/v [B, T, Hkv, D] at
    positions 0..T-1 of the row; ``segment_ids`` [B, T] or None (one segment);
    ``gate`` [B, T, Hq]: the compressed branch's gate (compressed_branch=True)."""
    cfg = self.cfg
    mask = pattern_mask(cfg, train)
    if cfg.attention == "topk":
      scores = o_cmp = None
      if self.compressed:
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        o_cmp, scores = compressed_attention(q, k, v, pos, cfg.block_size, segment_ids,
                                             segment_ids)
      if cfg.topk_scores != "compressed":
        scores = None

      def op(q, k, v, seg, scores=None):
        if cfg.topk_scores == "quest":
          scores = attention_ops.quest_scores(q, k, block_size=cfg.block_size)
        elif scores is not None:
          scores = scores.transpose(0, 2, 1, 3)
        return attention_ops.topk_block_attention(
            q, k, v, top_k=cfg.top_k, block_size=cfg.block_size,
            query_block=cfg.query_block or None, local_blocks=cfg.local_blocks,
            sink_blocks=cfg.sink_blocks, segment_ids=seg, impl=cfg.attention_impl,
            token_scores=scores, scale=self.scale, softcap=self.softcap)
      o = _per_shard(op, q, k, v, segment_ids, impl=cfg.attention_impl, scores=scores)
      return o if o_cmp is None else o + gate[..., None].astype(o.dtype) * o_cmp
    if mask is not None:
      op = lambda q, k, v, seg: attention_ops.block_sparse_attention(
          q, k, v, mask, segment_ids=seg, block_q=cfg.block_size, block_kv=cfg.block_size,
          scale=self.scale, softcap=self.softcap, impl=cfg.attention_impl)
    elif segment_ids is None:
      return self.dense(q, k, v)
    else:
      idx = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_ids.shape)
      return self.dense(q, k, v, attention_mask(idx, idx, segment_ids, segment_ids))
    # S2 shifts half of all heads: a shard of heads cannot know which are its.
    return _per_shard(op, q, k, v, segment_ids, impl=cfg.attention_impl,
                      split_heads=cfg.attention != "s2")

  def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
               train: bool = False) -> jax.Array:
    """x [B, T, d] -> [B, T, d]; ``train`` turns on S2 (LongLoRA trains with it only)."""
    q, k, v = self._qkv(x, positions)
    return self._out(self.attend(q, k, v, segment_ids, train, self._gate(x)))

  def _gate(self, x: jax.Array) -> jax.Array | None:
    return jax.nn.sigmoid(self.cmp_gate(x)) if self.compressed else None

  def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
    """Zero keys and values of every position: {"k", "v"} [B, max_len, Hkv, D]."""
    shape = (batch_size, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def decode(self, x: jax.Array, cache: dict, lengths: jax.Array, valid: jax.Array):
    """Attends new tokens x [B, Tn, d] at positions lengths + i to cache and themselves.

    Returns (out [B, Tn, d], cache) with the new keys/values written at
    positions lengths .. lengths + Tn - 1 of each sequence. ``valid`` [B, Tn]
    marks the real new tokens, a prefix (the rest is right padding, which the
    next call overwrites).
    """
    B, Tn, _ = x.shape
    positions = lengths[:, None] + jnp.arange(Tn)[None]
    q, k, v = self._qkv(x, positions)
    write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))
    cache = {name: write(cache[name], new.astype(cache[name].dtype), lengths)
             for name, new in (("k", k), ("v", v))}
    kc, vc = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
    if Tn == 1:
      o = self._decode_step(q[:, 0], kc, vc, lengths + 1)[:, None]
      # Pages by Quest bounds, not the branch's probabilities: the passkey benchmark
      # generated better with them (benchmarks/README.md, "Passkey retrieval").
      if self.compressed:
        o_cmp, _ = compressed_attention(q, kc, vc, positions, self.cfg.block_size)
        o = o + self._gate(x)[..., None].astype(o.dtype) * o_cmp
    elif self.cfg.attention in ("dense", "s2"):
      k_pos = jnp.broadcast_to(jnp.arange(kc.shape[1]), (B, kc.shape[1]))
      ones = jnp.ones_like
      mask = attention_mask(positions, k_pos, ones(positions), ones(k_pos))
      o = self.dense(q, kc, vc, mask)
    else:
      o = self._prefill(q, kc, vc, lengths, valid.sum(1), self._gate(x))
    return self._out(o), cache

  def _prefill(self, q, kc, vc, lengths, num_valid, gate=None):
    """Several new queries: the training attention over the whole cache, with
    the queries (and gates) placed at their positions (zeros elsewhere,
    outputs dropped) and keys past the valid tokens zeroed. From an empty
    cache this is the forward pass of the prompt, top-k selection included."""
    B, Tn = q.shape[:2]
    S = kc.shape[1]
    new_ok = jnp.arange(Tn)[None] < jnp.reshape(num_valid, (-1, 1))
    place = jax.vmap(lambda new, at: jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros((S,) + new.shape[1:], new.dtype), new, at, 0))
    q_all = place(jnp.where(new_ok[..., None, None], q, 0), lengths)
    gate = None if gate is None else place(gate, lengths)
    k_ok = (jnp.arange(S)[None] < (lengths + num_valid)[:, None])[..., None, None]
    o = self.attend(q_all, jnp.where(k_ok, kc, 0), jnp.where(k_ok, vc, 0), None, gate=gate)
    return jax.vmap(lambda a, at: jax.lax.dynamic_slice_in_dim(a, at, Tn, 0))(o, lengths)

  def _decode_step(self, q, kc, vc, lengths):
    """One query q [B, Hq, D] per sequence, its key already at lengths - 1:
    ``decode_attention`` on the cache (dense, s2, topk: Quest pages) or on the
    gathered sinks and window (global, sliding)."""
    cfg = self.cfg
    kw = dict(block_size=cfg.block_size, impl=cfg.attention_impl, scale=self.scale,
              softcap=self.softcap)
    if cfg.attention == "topk":
      kw["top_k_blocks"] = cfg.top_k + cfg.local_blocks + cfg.sink_blocks
    if cfg.attention in ("sliding", "global"):
      S = kc.shape[1]
      w = min(cfg.window, S)
      n = min(cfg.global_tokens, S) if cfg.attention == "global" else 0
      start = jnp.maximum(lengths - w, n)                     # window: keys start..lengths-1
      index = jnp.concatenate([jnp.broadcast_to(jnp.arange(n), (q.shape[0], n)),
                               start[:, None] + jnp.arange(w)[None]], axis=1)
      kc, vc = _gather_keys(kc, index), _gather_keys(vc, index)
      # The valid entries (index < lengths) are a prefix: sinks, then the window.
      lengths = jnp.minimum(lengths, n) + jnp.clip(lengths - start, 0, w)
    op = lambda q, kc, vc, lengths: attention_ops.decode_attention(q, kc, vc, lengths, **kw)
    return _per_shard(op, q, kc, vc, lengths, impl=cfg.attention_impl, single_query=True)


class Transformer(lm.LM):
  """The LM shell (``models.lm``) with attention mixers: ``blocks/i/attn_norm``,
  ``blocks/i/attn`` (:class:`Attention` with ``cfg.layer(i)``), Gemma 2's
  ``post_attn_norm`` / ``post_mlp_norm`` with ``post_norms``."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, lambda i: Attention(cfg.layer(i), rngs=rngs), rngs=rngs,
                     names=("attn_norm", "attn"), post_norms=cfg.post_norms,
                     mlp_activation=layers.activation(cfg.mlp_activation))
