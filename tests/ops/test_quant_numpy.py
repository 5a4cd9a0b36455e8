"""Independent float64 NumPy implementations of the ops.quant formats (test oracle).

Imported by the other test_quant*.py files; its own tests check the tables.

Written from the layout documented in ops/quant/reference.py, without its code:
decoding of the stored bytes, the e2m1 and NF4 tables, double quantization,
per-token activation quantization, W8A8 and LLM.int8().
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.scipy.special import ndtri

from ops.quant.reference import NF4_TABLE


def e2m1(code):
  """OCP fp4 e2m1 value of a 4-bit code (sign | 2 exponent bits, bias 1 | 1 mantissa bit)."""
  code = np.asarray(code)
  sign = np.where(code >> 3, -1.0, 1.0)
  e, m = (code >> 1) & 3, code & 1
  mag = np.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * 2.0 ** (e.astype(np.float64) - 1))
  return sign * mag


TABLES = {"nf4": np.asarray(NF4_TABLE, np.float64), "fp4": e2m1(np.arange(16)) / 6.0}


def codes(qw):
  """Unpacked stored codes [K, N] (grouped axis first) as int64 / float64."""
  v = np.asarray(qw.values)
  k = qw.shape[qw.axis]
  if qw.fmt in ("int4", "nf4", "fp4"):
    g = qw.group_size or k
    b = v.view(np.uint8).astype(np.int64).reshape(k // g, g // 2, -1)
    return np.concatenate([b & 15, b >> 4], axis=1).reshape(k, -1)
  if qw.fmt == "ternary":
    b = v.view(np.uint8).astype(np.int64)
    return np.concatenate([(b >> (2 * p)) & 3 for p in range(4)], axis=0)[:k]
  if qw.fmt == "fp8":
    return v.astype(np.float64)
  return v.astype(np.int64)


def scales(qw):
  """Float64 per-group scales [K/G, N] ([1, 1] per tensor)."""
  s = np.asarray(qw.scales)
  if qw.scale_scales is None:
    return s.astype(np.float64)
  flat = s.reshape(-1).astype(np.float64)
  s2 = np.repeat(np.asarray(qw.scale_scales, np.float64), 256)[:flat.size]
  return (flat * s2 + float(qw.scale_offset)).reshape(s.shape)


def values(qw):
  """Unscaled values [K, N] in float64 (zero point subtracted)."""
  c = codes(qw)
  if qw.fmt in TABLES:
    return TABLES[qw.fmt][c]
  if qw.fmt == "int4":
    if qw.zeros is None:
      return (c - 8).astype(np.float64)
    z = np.asarray(qw.zeros, np.int64)
    return (c - np.repeat(z, c.shape[0] // z.shape[0], axis=0)).astype(np.float64)
  if qw.fmt == "ternary":
    return (c - 1).astype(np.float64)
  return c.astype(np.float64)


def dequantize(qw):
  v = values(qw)
  s = scales(qw)
  w = v * np.repeat(s, v.shape[0] // s.shape[0], axis=0)
  return w if qw.axis == 0 else w.T


def quantize_tokens(x, qmax):
  """Per-row absmax scaling done in float32 as the op does: (x/s, s)."""
  x = np.asarray(x, np.float32)
  s = np.abs(x).max(axis=-1, keepdims=True) / np.float32(qmax)
  s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
  return x / s, s


def w8a8(x, qw):
  """W8A8: per-token int8 x (round half to even), exact integer dot, float64 scaling."""
  v, s = quantize_tokens(x, 127)
  xq = np.clip(np.round(v), -127, 127).astype(np.int64)
  acc = xq @ values(qw).astype(np.int64)
  return acc * s.astype(np.float64) * scales(qw)[0]


def fp8_act(x, qw):
  v, s = quantize_tokens(x, 448)
  x8 = np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return (x8 @ codes(qw)) * s.astype(np.float64) * scales(qw)[0]


def llm_int8(x, qw, threshold):
  x = np.asarray(x, np.float32)
  mask = (np.abs(x) >= threshold).any(axis=0)
  x_out = np.where(mask, x, 0).astype(np.float64)
  return x_out @ dequantize(qw) + w8a8(np.where(mask, 0, x), qw)


def test_nf4_table_is_qlora_normal_quantiles():
  """NF4 = sorted N(0,1) quantiles (QLoRA construction, offset 0.9677083), max-normalized."""
  offset = 0.9677083
  pos = ndtri(jnp.linspace(offset, 0.5, 9, dtype=jnp.float32)[:-1])
  neg = -ndtri(jnp.linspace(offset, 0.5, 8, dtype=jnp.float32)[:-1])
  v = np.sort(np.concatenate([np.asarray(pos), [0.0], np.asarray(neg)]).astype(np.float64))
  np.testing.assert_allclose(TABLES["nf4"], v / v.max(), atol=2e-6)
  assert TABLES["nf4"][7] == 0.0 and len(set(NF4_TABLE)) == 16


def test_fp4_table_is_e2m1():
  from ops.quant.reference import FP4_TABLE
  np.testing.assert_array_equal(np.asarray(FP4_TABLE) * 6,
                                [0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])
  np.testing.assert_allclose(FP4_TABLE, TABLES["fp4"], rtol=0, atol=1e-15)
