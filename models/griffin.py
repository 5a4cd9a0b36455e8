"""Griffin and Hawk (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences
with Local Attention for Efficient Language Models"; the recurrentgemma code).

The LM shell (``models.lm``) with temporal mixers that follow
``block_pattern`` cyclically: ``R`` a recurrent block, ``A`` a local (sliding
window) attention block. Griffin is ``"RRA"``, Hawk ``"R"``. The MLP is the
gated MLP with GeLU (expansion ``mlp_dim``).

Recurrent block (width ``lru_width``):

    y   = GeLU(x W_y)
    u   = Conv1D_4(x W_u)                  (temporal conv, width 4)
    h   = RG-LRU(u)
    out = (h * y) W_o

RG-LRU, with sigma the logistic function and c = 8:

    r_t = sigma(u_t W_a + b_a)             recurrence gate
    i_t = sigma(u_t W_x + b_x)             input gate
    a_t = sigma(Lambda)^(c r_t)            log a_t = -c r_t softplus(-Lambda)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)

At a segment start (document start in a packed row) a_t = 0 and the
sqrt(1 - a_t^2) factor is 1 (as recurrentgemma), and the convolution sees no
input from before it. The recurrence runs in float32 through
``ops.scan.linear_scan``. Lambda is initialised so that a^c = sigma(Lambda)^c
is uniform in [0.9, 0.999] (the paper). The gate weights W_a, W_x are block
diagonal with ``num_heads`` blocks (recurrentgemma). The derivative of
sqrt(1 - a^2) is bounded at a -> 1 (recurrentgemma bounds it at 1000).

Local attention is ``models.transformer.Attention`` with
``attention="sliding"`` (grouped-query heads; one K/V head, MQA, by default as
Griffin): query i sees keys i - window < j <= i. RoPE rotates the first
``rope_fraction`` of each head's dimensions (rotate-half form); gemkit's
default 1.0 rotates all of them, recurrentgemma (and Hugging Face's
RecurrentGemma, which ``gemkit.hf`` imports) rotates half (0.5). Decoding
keeps the last min(window, max_len) keys and values in a ring buffer, so
every state is O(1) in the sequence length.

Pretrained checkpoints (``gemkit.hf``'s ``RecurrentGemmaForCausalLM``) set
the shell's ``embed_scale`` (bf16(sqrt(d)), as recurrentgemma's bf16
normaliser), ``norm_offset`` = 1 (RMSNorm weight w multiplies as 1 + w) and
``mlp_bias``, and the fields here: ``recurrent_bias`` (biases on W_y, W_u and
W_o of the recurrent block), ``qkv_bias`` / ``out_bias`` (the attention's
projections) and ``rope_fraction`` = 0.5. The defaults are gemkit's own
Griffin, unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers, lm, recurrent, transformer

C = 8.0                       # the RG-LRU's fixed exponent scale c
MAX_SQRT_GRADIENT = 1000.0    # bound on d sqrt(x) / dx near x = 0 (recurrentgemma)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GriffinConfig(recurrent.RecurrentLMConfig):
  """Hyper-parameters (the shared ones in ``recurrent.RecurrentLMConfig``).

  ``block_pattern``: temporal mixer of layer l is ``block_pattern[l % len]``,
  ``R`` (recurrent) or ``A`` (local attention). ``lru_width`` 0 means
  ``d_model``.
  """

  family: ClassVar[str] = "griffin"
  positive: ClassVar[tuple[str, ...]] = ("num_heads", "num_kv_heads", "head_dim",
                                         "conv_width", "window", "block_size")
  nonnegative: ClassVar[tuple[str, ...]] = ("lru_width",)

  num_heads: int
  head_dim: int
  num_kv_heads: int = 1
  lru_width: int = 0
  window: int = 2048
  block_pattern: str = "RRA"
  rope_theta: float = 10_000.0
  logits_softcap: float = 30.0          # Griffin caps its logits (the base: 0, none)
  block_size: int = 128               # local attention's block (ops.attention)
  attention_impl: str = "auto"
  rope_fraction: float = 1.0          # recurrentgemma: 0.5
  recurrent_bias: bool = False        # linear_y, linear_x, linear_out biases
  qkv_bias: bool = False
  out_bias: bool = False

  def __post_init__(self):
    super().__post_init__()
    if not self.block_pattern or set(self.block_pattern) - set("RA"):
      raise layers.FieldError("block_pattern", "must be a non-empty string of R (recurrent) "
                              f"and A (local attention), got {self.block_pattern!r}")
    if self.width % self.num_heads:
      raise layers.FieldError("num_heads", f"must divide the RG-LRU width {self.width} "
                              "(lru_width or d_model; its gates are block diagonal), "
                              f"got {self.num_heads}")
    if "A" in self.block_pattern:
      self.attention_config()   # GQA / RoPE checks

  @property
  def width(self) -> int:
    return self.lru_width or self.d_model

  @property
  def block_types(self) -> tuple[str, ...]:
    p = self.block_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  def attention_config(self) -> transformer.TransformerConfig:
    return transformer.TransformerConfig(
        vocab_size=self.vocab_size, num_layers=self.num_layers, d_model=self.d_model,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        mlp_dim=self.mlp_dim, rope_theta=self.rope_theta, attention="sliding",
        window=self.window, block_size=self.block_size, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, rope_fraction=self.rope_fraction,
        qkv_bias=self.qkv_bias, out_bias=self.out_bias, norm_eps=self.norm_eps,
        norm_offset=self.norm_offset)


@jax.custom_jvp
def sqrt_bounded(x: jax.Array) -> jax.Array:
  """sqrt(x) whose derivative is at most MAX_SQRT_GRADIENT (finite at x = 0)."""
  return jnp.sqrt(x)


@sqrt_bounded.defjvp
def _sqrt_bounded_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = jnp.sqrt(x)
  floor = 1.0 / (2.0 * MAX_SQRT_GRADIENT)
  return y, dx / (2.0 * jnp.maximum(y, floor))


def _lambda_init(key, shape, dtype, lo: float = 0.9, hi: float = 0.999):
  """Lambda with sigma(Lambda)^c ~ U[lo, hi]: Lambda = logit(u^(1/c))."""
  a = jax.random.uniform(key, shape, jnp.float32, lo, hi) ** (1.0 / C)
  return jnp.log(a / (1.0 - a)).astype(dtype)


class BlockDiagonalDense(nnx.Module):
  """y = x W + b with W block diagonal: ``num_blocks`` blocks [w/n, w/n]."""

  def __init__(self, width: int, num_blocks: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    n = width // num_blocks
    self.num_blocks, self.dtype = num_blocks, dtype
    self.kernel = layers.param(rngs, nnx.initializers.normal(n ** -0.5),
                               (num_blocks, n, n), param_dtype, ("heads", None, None))
    self.bias = layers.param(rngs, nnx.initializers.zeros, (num_blocks, n), param_dtype,
                             ("heads", None))

  def __call__(self, x: jax.Array) -> jax.Array:
    xs = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_blocks, -1)
    y = jnp.einsum("...hi,hij->...hj", xs, self.kernel[...].astype(self.dtype))
    return (y + self.bias[...].astype(self.dtype)).reshape(x.shape)


class RGLRU(nnx.Module):
  """The Real-Gated Linear Recurrent Unit (module docstring)."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, impl: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.impl = impl
    self.input_gate = BlockDiagonalDense(width, num_heads, **kw)
    self.recurrence_gate = BlockDiagonalDense(width, num_heads, **kw)
    self.a_param = layers.param(rngs, _lambda_init, (width,), param_dtype, ("mlp",))

  def coefficients(self, u: jax.Array, reset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a_t, sqrt(1 - a_t^2) i_t u_t) [B, T, w] in float32; reset [B, T] bool."""
    r = jax.nn.sigmoid(self.recurrence_gate(u).astype(jnp.float32))
    i = jax.nn.sigmoid(self.input_gate(u).astype(jnp.float32))
    log_a = -C * r * jax.nn.softplus(-self.a_param[...].astype(jnp.float32))
    reset = reset[..., None]
    a = jnp.where(reset, 0.0, jnp.exp(log_a))
    scale = jnp.where(reset, 1.0, sqrt_bounded(-jnp.expm1(2.0 * log_a)))
    return a, scale * i * u.astype(jnp.float32)

  def __call__(self, u: jax.Array, reset: jax.Array, h0: jax.Array | None = None,
               valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """u [B, T, w] -> (h [B, T, w] in u's dtype, last state [B, w] float32).

    ``valid`` [B, T] (decode): where False the state is left unchanged.
    """
    a, b = self.coefficients(u, reset)
    if valid is not None:
      a = jnp.where(valid[..., None], a, 1.0)
      b = jnp.where(valid[..., None], b, 0.0)
    h, h_last = recurrent.linear_scan(a, b, h0, self.impl)
    return h.astype(u.dtype), h_last


class RecurrentBlock(nnx.Module):
  """Griffin's recurrent temporal-mixing block (module docstring)."""

  def __init__(self, cfg: GriffinConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    w, bias = cfg.width, cfg.recurrent_bias
    self.linear_y = layers.Dense(cfg.d_model, w, names=("embed", "mlp"), use_bias=bias, **kw)
    self.linear_x = layers.Dense(cfg.d_model, w, names=("embed", "mlp"), use_bias=bias, **kw)
    self.conv = recurrent.Conv1D(cfg.conv_width, w, **kw)
    self.rg_lru = RGLRU(w, cfg.num_heads, impl=cfg.scan_impl, **kw)
    self.linear_out = layers.Dense(w, cfg.d_model, names=("mlp", "embed"), use_bias=bias, **kw)

  def __call__(self, x, segment_ids, positions, *, train: bool = False):
    del train   # the same in training
    u = self.conv(self.linear_x(x), segment_ids)
    h, _ = self.rg_lru(u, positions == 0)
    return self.linear_out(h * jax.nn.gelu(self.linear_y(x)))

  def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
    del max_len
    w = self.linear_out.in_features
    return {"conv": self.conv.init_state(batch_size, w, dtype),
            "h": jnp.zeros((batch_size, w), jnp.float32)}

  def decode(self, x, cache, lengths, valid):
    positions = lengths[:, None] + jnp.arange(x.shape[1])[None]
    u_in = self.linear_x(x)
    u = self.conv(u_in, state=cache["conv"])
    h, h_last = self.rg_lru(u, positions == 0, cache["h"], valid)
    conv = self.conv.next_state(u_in, cache["conv"], valid.sum(1))
    return self.linear_out(h * jax.nn.gelu(self.linear_y(x))), {"conv": conv, "h": h_last}


class LocalAttention(nnx.Module):
  """Sliding-window attention (``transformer.Attention``) with a ring-buffer cache."""

  def __init__(self, cfg: GriffinConfig, *, rngs: nnx.Rngs):
    self.window = cfg.window
    self.attn = transformer.Attention(cfg.attention_config(), rngs=rngs)

  def __call__(self, x, segment_ids, positions, *, train: bool = False):
    return self.attn(x, segment_ids, positions, train=train)

  def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
    """The ring {"k", "v"} [B, min(window, max_len), Hkv, D]."""
    return self.attn.init_cache(batch_size, min(self.window, max_len), dtype)

  def decode(self, x, cache, lengths, valid):
    """Slot s of the ring (size R) holds the latest position p < lengths with
    p = s mod R (none if p < 0); new tokens attend to the ring and to each
    other, then the ring takes the latest valid new token of each slot."""
    B, Tn, _ = x.shape
    R = cache["k"].shape[1]
    positions = lengths[:, None] + jnp.arange(Tn)[None]
    q, k, v = self.attn._qkv(x, positions)  # pylint: disable=protected-access
    slots = jnp.arange(R)[None]

    def latest(end):   # [B, 1] -> [B, R]: the latest position < end in each slot
      return end - 1 - jnp.remainder(end - 1 - slots, R)

    ring_pos = latest(lengths[:, None])
    k_pos = jnp.concatenate([ring_pos, positions], axis=1)
    k_ok = jnp.concatenate([ring_pos >= 0, valid], axis=1)
    diff = positions[:, :, None] - k_pos[:, None, :]
    mask = (diff >= 0) & (diff < self.window) & k_ok[:, None, :]
    keys = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
    o = self.attn.dense(q, keys, values, mask[:, None])
    new_pos = latest((lengths + valid.sum(1))[:, None])
    take = new_pos >= lengths[:, None]
    idx = jnp.clip(new_pos - lengths[:, None], 0, Tn - 1)[..., None, None]

    def write(ring, new):
      picked = jnp.take_along_axis(new.astype(ring.dtype), idx, axis=1)
      return jnp.where(take[..., None, None], picked, ring)

    cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
    return self.attn._out(o), cache  # pylint: disable=protected-access


class Griffin(lm.LM):
  """Griffin / Hawk LM: ``__call__`` for training, ``init_cache`` + ``decode``."""

  def __init__(self, cfg: GriffinConfig, *, rngs: nnx.Rngs):
    # Mixers first, then the shell: the order in which a seed draws the initial values.
    mixers = [RecurrentBlock(cfg, rngs=rngs) if kind == "R" else LocalAttention(cfg, rngs=rngs)
              for kind in cfg.block_types]
    super().__init__(cfg, mixers.__getitem__, rngs=rngs, mlp_activation=jax.nn.gelu)

