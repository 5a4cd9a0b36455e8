"""Linear-RNN language models: stacks of GLA, (gated) DeltaNet or Mamba-style layers.

The LM shell (``models.lm``: mixer, then SwiGLU MLP unless ``mlp_dim`` = 0)
around one kind of temporal mixer, ``mixer``:

* ``"gla"`` - gated linear attention (Yang et al. 2024, "Gated Linear
  Attention Transformers with Hardware-Efficient Training"), per key-dim decay:
      S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t,
      alpha_t = sigma(x_t W_1 W_2 + b)^(1/16)   (low-rank gate, rank gate_rank)
  through ``ops.scan.chunked_linear_attention``.
* ``"deltanet"`` / ``"gated_deltanet"`` - the delta rule (Schlag et al.
  2021; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
  Rule over Sequence Length" and "Gated Delta Networks"):
      S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
      beta_t = sigma(x_t w_beta),  k_t, q_t L2-normalised,
      alpha_t = exp(-exp(A) softplus(x_t w_alpha + b))   (gated only; else 1)
  through ``ops.scan.delta_rule``.
* ``"mamba"`` - a Mamba-style selective diagonal SSM (Gu & Dao 2023, S6) with
  state size N = ``state_dim`` per channel, through ``ops.scan.linear_scan``:
      h_t = a_t * h_{t-1} + (dt_t u_t) B_t,   y_t = h_t C_t + D u_t,
      a_t = exp(-dt_t exp(A_log)),  dt_t = softplus(u_t W_dt + b_dt)
  (u: the conv-filtered, SiLU-activated input branch; output gated by
  SiLU(z); low-rank dt as Mamba).

``eigenvalue_range`` (Grazzi et al. 2024, "Unlocking State-Tracking in Linear
RNNs Through Negative Eigenvalues"): ``"[0,1]"`` is the models as published;
``"[-1,1]"`` maps the diagonal transition a -> 2a - 1 (mamba) and beta ->
2 beta (DeltaNet: the eigenvalue 1 - beta of I - beta k k^T then lies in
[-1, 1]). Parity needs a negative eigenvalue. GLA's decay is a log decay, so
it has only the ``"[0,1]"`` range.

GLA and DeltaNet run q, k, v through a short causal convolution (width
``conv_width``, 0 for none) and SiLU; the mamba layer its input branch. q is
scaled by head_dim^-1/2. The per-head output is RMS-normalised and gated by
SiLU(x W_g) before the output projection.

Packed segments: the diagonal scan gets a_t = 0 at a segment start; the matrix
states get a log decay of ``RESET_LOG_DECAY`` there (a factor exp(-30) ~ 1e-13:
zero to float32 precision; the chunked ops take log decays, and -inf would
give inf - inf inside a chunk). Decoding steps one token with the
step-by-step recurrence (``ops.scan.linear_attention_steps`` /
``ops.scan.delta_rule_steps``, no 16-token chunk padding) and runs a longer
prompt through the chunked op from the cached state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers, lm, recurrent
from ops import scan

MIXERS = ("gla", "deltanet", "gated_deltanet", "mamba")
EIGENVALUE_RANGES = ("[0,1]", "[-1,1]")
RESET_LOG_DECAY = -30.0
GLA_DECAY_NORMALIZER = 16.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearRNNConfig(recurrent.RecurrentLMConfig):
  """Hyper-parameters (the shared ones in ``recurrent.RecurrentLMConfig``).

  ``num_heads`` x ``head_dim`` (key = value dim) for gla / deltanet; for
  mamba the inner width is ``expand * d_model`` with ``state_dim`` states per
  channel. ``chunk_size``: of the chunked ops. ``conv_width`` 0: no convolution.
  """

  family: ClassVar[str] = "linear_rnn"
  positive: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim", "state_dim", "expand",
                                         "gate_rank", "chunk_size")
  nonnegative: ClassVar[tuple[str, ...]] = ("conv_width",)

  mixer: str = "gla"
  num_heads: int = 4
  head_dim: int = 64
  eigenvalue_range: str = "[0,1]"
  state_dim: int = 16
  expand: int = 2
  gate_rank: int = 16
  chunk_size: int = 64

  def __post_init__(self):
    super().__post_init__()
    if self.mixer not in MIXERS:
      raise layers.FieldError("mixer", f"must be one of {MIXERS}, got {self.mixer!r}")
    if self.eigenvalue_range not in EIGENVALUE_RANGES:
      raise layers.FieldError("eigenvalue_range", f"must be one of {EIGENVALUE_RANGES}, "
                              f"got {self.eigenvalue_range!r}")
    if self.mixer == "gla" and self.negative_eigenvalues:
      raise layers.FieldError("eigenvalue_range", "'[-1,1]' needs mixer 'deltanet', "
                              "'gated_deltanet' or 'mamba' (GLA's decay is a log decay)")

  @property
  def negative_eigenvalues(self) -> bool:
    return self.eigenvalue_range == "[-1,1]"


def _kw(cfg, rngs):
  return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def _positions(lengths: jax.Array, n: int) -> jax.Array:
  return lengths[:, None] + jnp.arange(n)[None]


def _dt_bias_init(key, shape, dtype, lo: float = 1e-3, hi: float = 1e-1):
  """b with softplus(b) = dt ~ log-uniform [lo, hi] (Mamba)."""
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(lo), math.log(hi)))
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class _MatrixStateMixer(nnx.Module):
  """q, k, v heads -> a [K, V] state per head -> RMSNorm * SiLU gate -> output.

  Subclasses give ``_run(x, q, k, v, reset, valid, state) -> (o, state)``.
  """

  def __init__(self, cfg: LinearRNNConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.cfg = cfg
    hk = cfg.num_heads * cfg.head_dim
    self.q_proj = layers.Dense(cfg.d_model, hk, names=("embed", "heads"), **kw)
    self.k_proj = layers.Dense(cfg.d_model, hk, names=("embed", "heads"), **kw)
    self.v_proj = layers.Dense(cfg.d_model, hk, names=("embed", "heads"), **kw)
    self.conv = recurrent.Conv1D(cfg.conv_width, 3 * hk, **kw) if cfg.conv_width else None
    self.g_proj = layers.Dense(cfg.d_model, hk, names=("embed", "heads"), **kw)
    self.o_norm = recurrent.HeadNorm(cfg.head_dim, eps=cfg.norm_eps, rngs=rngs,
                                     param_dtype=jnp.dtype(cfg.param_dtype))
    self.o_proj = layers.Dense(hk, cfg.d_model, names=("heads", "embed"), **kw)

  def _qkv(self, x, segment_ids, conv_state):
    """(q, k, v [B, T, H, K], the conv's input [B, T, 3HK])."""
    qkv_in = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
    qkv = qkv_in
    if self.conv is not None:
      qkv = jax.nn.silu(self.conv(qkv_in, segment_ids, conv_state))
    B, T, _ = x.shape
    q, k, v = (t.reshape(B, T, self.cfg.num_heads, self.cfg.head_dim)
               for t in jnp.split(qkv, 3, axis=-1))
    q, k = self._prepare_qk(q, k)
    return q * self.cfg.head_dim ** -0.5, k, v, qkv_in

  def _prepare_qk(self, q, k):
    return q, k

  def _output(self, x, o):
    B, T = x.shape[:2]
    o = self.o_norm(o).reshape(B, T, -1) * jax.nn.silu(self.g_proj(x))
    return self.o_proj(o)

  def __call__(self, x, segment_ids, positions, *, train: bool = False):
    del train   # the same in training
    q, k, v, _ = self._qkv(x, segment_ids, None)
    o, _ = self._run(x, q, k, v, positions == 0, None, None)
    return self._output(x, o)

  def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
    del max_len
    c = self.cfg
    cache = {"S": jnp.zeros((batch_size, c.num_heads, c.head_dim, c.head_dim), jnp.float32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch_size, 3 * c.num_heads * c.head_dim, dtype)
    return cache

  def decode(self, x, cache, lengths, valid):
    q, k, v, qkv_in = self._qkv(x, None, cache.get("conv"))
    reset = _positions(lengths, x.shape[1]) == 0
    o, state = self._run(x, q, k, v, reset, valid, cache["S"])
    new = {"S": state}
    if self.conv is not None:
      new["conv"] = self.conv.next_state(qkv_in, cache["conv"], valid.sum(1))
    return self._output(x, o), new

  def _recurrence(self, chunked, steps, args, state):
    """The chunked op, or the step-by-step recurrence for one decoded token
    (the chunked op would pad it to a chunk)."""
    if state is not None and args[0].shape[1] == 1:
      return steps(*args, initial_state=state)
    return recurrent.matrix_state_op(chunked, self.cfg.scan_impl, args, state,
                                     chunk_size=self.cfg.chunk_size)


class GatedLinearAttention(_MatrixStateMixer):
  """GLA: per key-dim decay alpha_t = sigma(x W_1 W_2 + b)^(1/16)."""

  def __init__(self, cfg: LinearRNNConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    kw = _kw(cfg, rngs)
    self.gk_down = layers.Dense(cfg.d_model, cfg.gate_rank, names=("embed", None), **kw)
    self.gk_up = layers.Dense(cfg.gate_rank, cfg.num_heads * cfg.head_dim,
                              names=(None, "heads"), use_bias=True, **kw)

  def log_decay(self, x, reset):
    """log alpha [B, T, H, K] float32, RESET_LOG_DECAY added at resets."""
    g = jax.nn.log_sigmoid(self.gk_up(self.gk_down(x)).astype(jnp.float32))
    g = g.reshape(*x.shape[:2], self.cfg.num_heads, -1) / GLA_DECAY_NORMALIZER
    return g + RESET_LOG_DECAY * reset[..., None, None]

  def _run(self, x, q, k, v, reset, valid, state):
    g = self.log_decay(x, reset)
    if valid is not None:
      k = jnp.where(valid[..., None, None], k, 0)
      g = jnp.where(valid[..., None, None], g, 0.0)
    return self._recurrence(scan.chunked_linear_attention, scan.linear_attention_steps,
                            (q, k, v, g), state)


class DeltaNet(_MatrixStateMixer):
  """(Gated) DeltaNet; beta -> 2 beta for eigenvalue_range '[-1,1]'."""

  def __init__(self, cfg: LinearRNNConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    kw = _kw(cfg, rngs)
    self.gated = cfg.mixer == "gated_deltanet"
    self.b_proj = layers.Dense(cfg.d_model, cfg.num_heads, names=("embed", "heads"), **kw)
    if self.gated:
      self.a_proj = layers.Dense(cfg.d_model, cfg.num_heads, names=("embed", "heads"), **kw)
      self.a_log = layers.param(
          rngs, lambda key, s, d: jnp.log(jax.random.uniform(key, s, d, 1.0, 16.0)),
          (cfg.num_heads,), jnp.dtype(cfg.param_dtype), ("heads",))
      self.dt_bias = layers.param(rngs, _dt_bias_init, (cfg.num_heads,),
                                  jnp.dtype(cfg.param_dtype), ("heads",))

  def _prepare_qk(self, q, k):
    return _l2_normalize(q), _l2_normalize(k)

  def beta(self, x):
    """beta [B, T, H] float32: sigma(x w), doubled for the [-1, 1] range."""
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    return 2.0 * beta if self.cfg.negative_eigenvalues else beta

  def log_decay(self, x, reset):
    """log alpha [B, T, H] float32 (0 if not gated), RESET_LOG_DECAY at resets."""
    g = jnp.zeros(x.shape[:2] + (self.cfg.num_heads,), jnp.float32)
    if self.gated:
      dt = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
      g = -jnp.exp(self.a_log[...].astype(jnp.float32)) * dt
    return g + RESET_LOG_DECAY * reset[..., None]

  def _run(self, x, q, k, v, reset, valid, state):
    beta, g = self.beta(x), self.log_decay(x, reset)
    if valid is not None:
      beta = jnp.where(valid[..., None], beta, 0.0)
      g = jnp.where(valid[..., None], g, 0.0)
    return self._recurrence(scan.delta_rule, scan.delta_rule_steps, (q, k, v, beta, g),
                            state)


class DiagonalSSM(nnx.Module):
  """Mamba-style selective diagonal SSM; a -> 2a - 1 for eigenvalue_range '[-1,1]'."""

  def __init__(self, cfg: LinearRNNConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    e, n = cfg.expand * cfg.d_model, cfg.state_dim
    self.dt_rank = math.ceil(cfg.d_model / 16)
    self.in_proj = layers.Dense(cfg.d_model, 2 * e, names=("embed", "mlp"), **kw)
    self.conv = recurrent.Conv1D(cfg.conv_width, e, **kw) if cfg.conv_width else None
    self.x_proj = layers.Dense(e, self.dt_rank + 2 * n, names=("mlp", None), **kw)
    self.dt_proj = layers.Dense(self.dt_rank, e, names=(None, "mlp"), **kw)
    self.dt_bias = layers.param(rngs, _dt_bias_init, (e,), pdt, ("mlp",))
    self.a_log = layers.param(
        rngs, lambda key, s, d: jnp.broadcast_to(jnp.log(jnp.arange(1, s[1] + 1, dtype=d)), s),
        (e, n), pdt, ("mlp", None))
    self.d_skip = layers.param(rngs, nnx.initializers.ones, (e,), pdt, ("mlp",))
    self.out_proj = layers.Dense(e, cfg.d_model, names=("mlp", "embed"), **kw)

  def _branches(self, x, segment_ids, conv_state):
    """(u [B, T, E] after conv + SiLU, gate z, the conv's input)."""
    u_in, z = jnp.split(self.in_proj(x), 2, axis=-1)
    u = u_in if self.conv is None else self.conv(u_in, segment_ids, conv_state)
    return jax.nn.silu(u), z, u_in

  def coefficients(self, u, reset):
    """(a, b [B, T, E, N], C [B, T, N]) float32; a = 0 at resets."""
    n = self.cfg.state_dim
    proj = self.x_proj(u).astype(jnp.float32)
    dt_in, b_t, c_t = jnp.split(proj, [self.dt_rank, self.dt_rank + n], axis=-1)
    dt = jax.nn.softplus(self.dt_proj(dt_in).astype(jnp.float32) + self.dt_bias[...])
    a = jnp.exp(-dt[..., None] * jnp.exp(self.a_log[...].astype(jnp.float32)))
    if self.cfg.negative_eigenvalues:
      a = 2.0 * a - 1.0
    a = jnp.where(reset[..., None, None], 0.0, a)
    b = (dt * u.astype(jnp.float32))[..., None] * b_t[:, :, None, :]
    return a, b, c_t

  def _ssm(self, u, z, reset, valid, h0):
    B, T, e = u.shape
    a, b, c_t = self.coefficients(u, reset)
    if valid is not None:
      a = jnp.where(valid[..., None, None], a, 1.0)
      b = jnp.where(valid[..., None, None], b, 0.0)
    h, h_last = recurrent.linear_scan(a.reshape(B, T, -1), b.reshape(B, T, -1), h0,
                                      self.cfg.scan_impl)
    y = jnp.einsum("bten,btn->bte", h.reshape(a.shape), c_t)
    y = y + self.d_skip[...].astype(jnp.float32) * u.astype(jnp.float32)
    return self.out_proj((y * jax.nn.silu(z.astype(jnp.float32))).astype(u.dtype)), h_last

  def __call__(self, x, segment_ids, positions, *, train: bool = False):
    del train   # the same in training
    u, z, _ = self._branches(x, segment_ids, None)
    return self._ssm(u, z, positions == 0, None, None)[0]

  def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
    del max_len
    e = self.cfg.expand * self.cfg.d_model
    cache = {"h": jnp.zeros((batch_size, e * self.cfg.state_dim), jnp.float32)}
    if self.conv is not None:
      cache["conv"] = self.conv.init_state(batch_size, e, dtype)
    return cache

  def decode(self, x, cache, lengths, valid):
    u, z, u_in = self._branches(x, None, cache.get("conv"))
    reset = _positions(lengths, x.shape[1]) == 0
    y, h = self._ssm(u, z, reset, valid, cache["h"])
    new = {"h": h}
    if self.conv is not None:
      new["conv"] = self.conv.next_state(u_in, cache["conv"], valid.sum(1))
    return y, new


_MIXER_CLASSES = {"gla": GatedLinearAttention, "deltanet": DeltaNet,
                  "gated_deltanet": DeltaNet, "mamba": DiagonalSSM}


class LinearRNN(lm.LM):
  """A stack of ``cfg.mixer`` layers: ``__call__`` for training, ``decode`` for sampling."""

  def __init__(self, cfg: LinearRNNConfig, *, rngs: nnx.Rngs):
    # Mixers first, then the shell: the order in which a seed draws the initial values.
    mixers = [_MIXER_CLASSES[cfg.mixer](cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    super().__init__(cfg, mixers.__getitem__, rngs=rngs)
