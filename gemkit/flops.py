"""Model FLOPs per token, for the MFU estimate of the training metrics.

Counted (multiply-adds as 2 FLOPs), per token of a sequence of T tokens:

* every matmul with a weight: ``2 * in * out`` for each ``Dense`` (float or
  quantized: the model's FLOPs, not the dequantization's), each adapter's
  ``2 * r * (in + out)``, each block-diagonal gate, and the tied output
  head ``2 * d * V``;
* softmax attention: ``4 * Hq * D * keys`` (scores and values), where keys
  is the mean number of keys each query's computed blocks hold: T for
  dense attention (``jax.nn.dot_product_attention`` scores the whole T x T
  matrix), the non-empty blocks of the pattern's mask (``ops.attention``
  skips empty blocks, and computes a partial block whole) for sliding / S2 /
  global, and ``top_k + local + sink`` blocks (fewer where causality leaves
  fewer) for top-k, plus the compressed branch's pooled keys;
* a matrix-state linear RNN (GLA, DeltaNet): ``4 * H * K * V`` (state
  update and read-out).

Elementwise work (norms, activations, RoPE, gates, the RG-LRU's scan) is
left out, as in PaLM's MFU (Chowdhery et al. 2022, appendix B). A training
step is 3x the forward pass (forward, and a backward of twice its cost).
"""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from models import griffin, layers, linear_rnn, transformer
from ops import attention as attention_ops


def attended_keys(cfg: transformer.TransformerConfig, seq_len: int, train: bool = True
                  ) -> float:
  """Mean keys per query that a layer of ``cfg`` scores over ``seq_len`` tokens."""
  T, bs = seq_len, cfg.block_size
  if cfg.attention == "topk":
    qb = cfg.query_block or bs
    rows = np.arange(-(-T // qb))
    available = np.minimum(-(-np.minimum((rows + 1) * qb, T) // bs), -(-T // bs))
    keys = np.minimum(cfg.top_k + cfg.local_blocks + cfg.sink_blocks, available).mean() * bs
    return float(min(keys, T) + (T // bs if cfg.compressed_branch else 0))
  mask = transformer.pattern_mask(cfg, train)
  if mask is None:
    return float(T)
  kinds, _ = attention_ops.block_kinds(mask, T, T, bs, bs, cfg.num_heads)
  return float(np.mean(np.sum(np.asarray(kinds) > 0, axis=-1)) * bs)


def forward_flops_per_token(model: nnx.Module, seq_len: int, train: bool = True) -> float:
  """Forward-pass FLOPs per token of ``model`` (a real or abstract NNX model)."""
  total = 0.0
  for _, m in nnx.iter_modules(model):
    if isinstance(m, layers.Dense):
      total += 2 * m.in_features * m.out_features
    elif isinstance(m, griffin.BlockDiagonalDense):
      total += 2 * math.prod(m.kernel.shape)
    elif isinstance(m, transformer.Attention):
      total += 4 * m.cfg.num_heads * m.cfg.head_dim * attended_keys(m.cfg, seq_len, train)
    elif isinstance(m, linear_rnn._MatrixStateMixer):  # pylint: disable=protected-access
      total += 4 * m.cfg.num_heads * m.cfg.head_dim ** 2
    elif isinstance(getattr(m, "a", None), nnx.LoRAParam):   # a gemkit.surgery.lora.Adapter
      total += 2 * (math.prod(m.a.shape) + math.prod(m.b.shape))
  head = getattr(model, "head", "untied")
  if head is None:                           # tied: logits = x E^T
    total += 2 * math.prod(model.embed.embedding.shape)
  return total


def train_flops_per_token(model: nnx.Module, seq_len: int) -> float:
  """FLOPs per trained token of a step: 3x the forward pass."""
  return 3 * forward_flops_per_token(model, seq_len, train=True)
