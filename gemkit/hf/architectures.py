"""Hugging Face architectures as gemkit model configs and parameter maps.

Each supported ``architectures[0]`` of a ``config.json`` is an
:class:`Architecture`: how its config becomes a gemkit ``config.model`` block
(one of the existing families: no model class per checkpoint), how a gemkit
config goes back, and which safetensors name holds which gemkit parameter.

Conventions bridged here:

* ``nn.Linear.weight`` is ``[out, in]``; a gemkit ``Dense.kernel`` is
  ``[in, out]`` (``Tensor.transpose``).
* RMSNorm multiplies by ``offset + w``: 0 for Llama, Qwen and Mistral, 1 for
  the Gemma family. A gemkit config records its own ``norm_offset``; the
  stored weight is shifted by the difference (``Tensor.shift``), so a
  gemkit-trained model (offset 0) exports to Gemma exactly.

``RecurrentGemmaForCausalLM`` maps onto the ``griffin`` family (its own
section at the end of this module).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from models import griffin, transformer

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One stored tensor: safetensors ``name`` <-> gemkit parameter ``path``.

  ``hf = shift + (gemkit.T if transpose else gemkit)``; ``to_gemkit`` /
  ``to_hf`` replace that for layouts that are not a transpose (whole-tensor
  functions, e.g. a reversed convolution kernel).
  """

  name: str
  path: tuple
  transpose: bool = False
  shift: float = 0.0
  to_gemkit: Callable[[np.ndarray], np.ndarray] | None = None
  to_hf: Callable[[np.ndarray], np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A Hugging Face ``*ForCausalLM`` class mapped onto a gemkit family.

  ``to_config(hf_config) -> config.model`` dict; ``from_config(model cfg
  dataclass) -> config.json`` dict; ``unsupported(cfg)`` says why this
  architecture cannot express a gemkit config (None: it can);
  ``tensors(cfg)`` lists every stored tensor.
  """

  name: str
  model_type: str
  to_config: Callable[[Mapping[str, Any]], dict]
  from_config: Callable[[Any], dict]
  unsupported: Callable[[Any], str | None]
  tensors: Callable[[Any], list[Tensor]]


# --- decoder-only transformers ------------------------------------------------------


def _rope_config(hf: Mapping[str, Any]) -> dict:
  """RoPE fields from ``rope_parameters`` (transformers >= 5) or the older
  top-level ``rope_theta`` + ``rope_scaling``."""
  rope = dict(hf.get("rope_parameters") or {})
  if not rope:
    rope = dict(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  out = {"rope_theta": float(rope.get("rope_theta", 10_000.0)), "rope_type": kind,
         "rope_fraction": float(rope.get("partial_rotary_factor", 1.0))}
  if kind == "linear":
    out["rope_factor"] = float(rope["factor"])
  elif kind == "llama3":
    out.update(rope_factor=float(rope["factor"]),
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]),
               rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif kind != "default":
    raise ValueError(f"config.json: rope type {kind!r} is not supported "
                     "(supported: default, linear, llama3)")
  return out


def _rope_parameters(cfg) -> dict:
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_fraction != 1.0:
    rope["partial_rotary_factor"] = cfg.rope_fraction
  if cfg.rope_type == "linear":
    rope["factor"] = cfg.rope_factor
  elif cfg.rope_type == "llama3":
    rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return rope


def _activation(hf: Mapping[str, Any], default: str) -> str:
  name = hf.get("hidden_activation") or hf.get("hidden_act") or default
  if name not in ACTIVATIONS:
    raise ValueError(f"config.json: hidden_act {name!r} is not supported "
                     f"(supported: {sorted(ACTIVATIONS)})")
  return ACTIVATIONS[name]


def _layer_pattern(hf: Mapping[str, Any], n: int) -> dict:
  """attention / window / layer_pattern from ``layer_types`` (or Qwen2's
  ``use_sliding_window`` + ``max_window_layers``, or Mistral's window)."""
  types = hf.get("layer_types")
  if types is None and hf.get("use_sliding_window"):
    first = hf.get("max_window_layers", 0)
    types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
  window = hf.get("sliding_window")
  if types is None:
    return ({"attention": "sliding", "window": int(window)} if window
            else {"attention": "dense"})
  pattern = "".join("L" if t == "sliding_attention" else "G" for t in types)
  if "L" not in pattern or not window:
    return {"attention": "dense"}
  if "G" not in pattern:
    return {"attention": "sliding", "window": int(window)}
  return {"attention": "dense", "window": int(window), "layer_pattern": pattern}


def _transformer_config(hf: Mapping[str, Any], *, tie_default: bool, norm_offset: float = 0.0,
                        embed_scale: float = 1.0, activation: str = "silu",
                        **extra) -> dict:
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  n = hf["num_hidden_layers"]
  values = {
      "family": "transformer", "vocab_size": hf["vocab_size"], "num_layers": n,
      "d_model": d, "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or d // heads, "mlp_dim": hf["intermediate_size"],
      "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", tie_default)),
      "norm_offset": norm_offset, "embed_scale": embed_scale,
      "mlp_activation": _activation(hf, activation),
      **_rope_config(hf), **_layer_pattern(hf, n), **extra}
  return dataclasses.asdict(transformer.TransformerConfig.from_config(values)) | {
      "family": "transformer"}


def _transformer_json(cfg, arch: str, model_type: str, **extra) -> dict:
  out = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
         "hidden_act": HF_ACTIVATIONS[cfg.mlp_activation],
         "hidden_activation": HF_ACTIVATIONS[cfg.mlp_activation], "rms_norm_eps": cfg.norm_eps,
         "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": _rope_parameters(cfg),
         "max_position_embeddings": max(cfg.rope_original_max_len, 8192),
         "dtype": cfg.param_dtype}
  p = cfg.layer_pattern or ("L" if cfg.attention == "sliding" else "G")
  out["layer_types"] = ["sliding_attention" if p[i % len(p)] == "L" else "full_attention"
                        for i in range(cfg.num_layers)]
  out["sliding_window"] = cfg.window if "L" in p else None
  return out | extra


def _transformer_unsupported(cfg, *, arch: str, embed: str, biases: str = "",
                             sliding: str = "no", post_norms: bool = False,
                             qk_norm: bool = False, softcaps: bool = False) -> str | None:
  """Why ``arch`` cannot hold a gemkit transformer config (None: it can).

  ``embed``: "one" (x_0 = E[t]) or "sqrt_d" (Gemma); ``biases``: the biases
  it has ("qkv": q/k/v always, "attention": q/k/v/o together or not at all,
  "mlp"); ``sliding``: "no", "all" (it is a sliding-window model: one window
  for every layer) or "layers" (optional, per layer); ``post_norms`` and
  ``qk_norm``: it always has them; ``softcaps``: it has soft-caps and a
  free attention scale (Gemma 2's query_pre_attn_scalar).
  """
  if getattr(cfg, "family", "transformer") != "transformer":
    return f"{arch} is a transformer"
  if cfg.attention in ("topk", "global") or cfg.compressed_branch:
    return f"{arch} has no {cfg.attention} attention (exportable: dense, s2, sliding)"
  has_sliding = cfg.attention == "sliding" or bool(cfg.layer_pattern)
  if has_sliding and sliding == "no":
    return f"{arch} has no sliding-window attention"
  if not has_sliding and sliding == "all":
    return f"{arch} is a sliding-window model"
  if cfg.layer_pattern and sliding != "layers":
    return f"{arch} has one attention pattern for every layer"
  scale = cfg.embed_scale or math.sqrt(cfg.d_model)
  want = 1.0 if embed == "one" else math.sqrt(cfg.d_model)
  if not math.isclose(scale, want, rel_tol=1e-6):
    return f"{arch} scales embeddings by {want:g}, this model by {scale:g}"
  for flag, name in (("qkv_bias", "qkv"), ("out_bias", "attention"), ("mlp_bias", "mlp")):
    if getattr(cfg, flag) and name not in biases and not (flag == "qkv_bias"
                                                          and "attention" in biases):
      return f"{arch} has no {flag}"
  if "attention" in biases and cfg.qkv_bias != cfg.out_bias:
    return f"{arch} has q/k/v and output biases together or not at all"
  if "qkv" in biases and not cfg.qkv_bias:
    return f"{arch} always has q/k/v biases"
  if cfg.post_norms != post_norms:
    return f"{arch} {'always has' if post_norms else 'has no'} post-norms"
  if cfg.qk_norm != qk_norm:
    return f"{arch} {'always has' if qk_norm else 'has no'} q/k norms"
  if (cfg.attn_softcap or cfg.logits_softcap) and not softcaps:
    return f"{arch} has no soft-caps"
  if cfg.attn_scale and not softcaps and not math.isclose(cfg.attn_scale, cfg.head_dim ** -0.5):
    return f"{arch} scales attention logits by head_dim^-1/2"
  return None


def _transformer_tensors(cfg, *, hf_offset: float, gemma2_norms: bool = False) -> list[Tensor]:
  shift = cfg.norm_offset - hf_offset
  t = [Tensor("model.embed_tokens.weight", ("embed", "embedding")),
       Tensor("model.norm.weight", ("final_norm", "scale"), shift=shift)]
  if not cfg.tie_embeddings:
    t.append(Tensor("lm_head.weight", ("head", "kernel"), transpose=True))
  norms = ({"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "mlp_norm",
            "post_feedforward_layernorm": "post_mlp_norm"} if gemma2_norms else
           {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"})
  for i in range(cfg.num_layers):
    pre, at = f"model.layers.{i}", ("blocks", i)
    t += [Tensor(f"{pre}.{hf}.weight", at + (ours, "scale"), shift=shift)
          for hf, ours in norms.items()]
    linears = [("self_attn", p, cfg.qkv_bias) for p in ("q_proj", "k_proj", "v_proj")]
    linears += [("self_attn", "o_proj", cfg.out_bias)]
    linears += [("mlp", p, cfg.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]
    for parent, proj, bias in linears:
      ours = at + ("attn" if parent == "self_attn" else "mlp", proj)
      t.append(Tensor(f"{pre}.{parent}.{proj}.weight", ours + ("kernel",), transpose=True))
      if bias:
        t.append(Tensor(f"{pre}.{parent}.{proj}.bias", ours + ("bias",)))
    if cfg.qk_norm:
      t += [Tensor(f"{pre}.self_attn.{n}.weight", at + ("attn", n, "scale"), shift=shift)
            for n in ("q_norm", "k_norm")]
  return t


def _decoder(name: str, model_type: str, *, tie_default: bool, hf_offset: float = 0.0,
             embed: str = "one", activation: str = "silu", biases: str = "",
             sliding: str = "no", post_norms: bool = False, qk_norm: bool = False,
             softcaps: bool = False, config_extra: Callable[[Mapping], dict] = lambda hf: {},
             json_extra: Callable[[Any], dict] = lambda cfg: {}) -> Architecture:
  """An :class:`Architecture` for a Llama-like decoder with these features."""

  def to_config(hf):
    extra = {"embed_scale": math.sqrt(hf["hidden_size"]) if embed == "sqrt_d" else 1.0}
    if "attention" in biases:
      extra["qkv_bias"] = extra["out_bias"] = bool(hf.get("attention_bias", False))
    if "qkv" in biases:
      extra["qkv_bias"] = True
    if "mlp" in biases:
      extra["mlp_bias"] = bool(hf.get("mlp_bias", False))
    return _transformer_config(hf, tie_default=tie_default, norm_offset=hf_offset,
                               activation=activation, qk_norm=qk_norm,
                               post_norms=post_norms, **extra, **config_extra(hf))

  def from_config(cfg):
    extra = {}
    if "attention" in biases:
      extra["attention_bias"] = cfg.qkv_bias
    if "mlp" in biases:
      extra["mlp_bias"] = cfg.mlp_bias
    out = _transformer_json(cfg, name, model_type, **extra, **json_extra(cfg))
    if sliding != "layers":       # one pattern for all layers: no layer_types
      del out["layer_types"]
    return out

  def unsupported(cfg):
    return _transformer_unsupported(cfg, arch=name, embed=embed, biases=biases,
                                    sliding=sliding, post_norms=post_norms, qk_norm=qk_norm,
                                    softcaps=softcaps)

  return Architecture(name, model_type, to_config, from_config, unsupported,
                      lambda cfg: _transformer_tensors(cfg, hf_offset=hf_offset,
                                                       gemma2_norms=post_norms))


def _gemma2_config(hf) -> dict:
  caps = {"attn_softcap": float(hf.get("attn_logit_softcapping") or 0.0),
          "logits_softcap": float(hf.get("final_logit_softcapping") or 0.0)}
  scalar = hf.get("query_pre_attn_scalar")
  return caps | ({"attn_scale": float(scalar) ** -0.5} if scalar else {})


def _gemma2_json(cfg) -> dict:
  return {"attn_logit_softcapping": cfg.attn_softcap or None,
          "final_logit_softcapping": cfg.logits_softcap or None,
          "query_pre_attn_scalar": round((cfg.attn_scale or cfg.head_dim ** -0.5) ** -2)}


def _qwen2_json(cfg) -> dict:
  sliding = cfg.attention == "sliding" or bool(cfg.layer_pattern)
  return {"use_sliding_window": sliding, "sliding_window": cfg.window if sliding else None,
          "max_window_layers": 0 if sliding else cfg.num_layers}


# Export tries these in order and takes the first that can express the model,
# so an imported model goes back to its own architecture.
DECODERS = (
    _decoder("Gemma2ForCausalLM", "gemma2", tie_default=True, hf_offset=1.0, embed="sqrt_d",
             activation="gelu_tanh", sliding="layers", post_norms=True, softcaps=True,
             config_extra=_gemma2_config, json_extra=_gemma2_json),
    _decoder("Qwen3ForCausalLM", "qwen3", tie_default=False, biases="attention",
             sliding="layers", qk_norm=True),
    _decoder("GemmaForCausalLM", "gemma", tie_default=True, hf_offset=1.0, embed="sqrt_d",
             activation="gelu_tanh"),
    _decoder("Qwen2ForCausalLM", "qwen2", tie_default=False, biases="qkv", sliding="layers",
             json_extra=_qwen2_json),
    _decoder("MistralForCausalLM", "mistral", tie_default=False, sliding="all"),
    _decoder("LlamaForCausalLM", "llama", tie_default=False, biases="attention,mlp"),
)

# --- RecurrentGemma: Griffin (models.griffin) -------------------------------------------
#
# transformers' RecurrentGemmaForCausalLM against gemkit's Griffin:
#   x_0 = normaliser * E[t], normaliser = bf16(sqrt(hidden_size)) -> embed_scale
#   RMSNorm (1 + w)                                               -> norm_offset 1
#   MLP: gelu_pytorch_tanh, biases, width intermediate_size // 2  -> mlp_bias, mlp_dim
#   linear_x / linear_y / linear_out biases                       -> recurrent_bias
#   conv_1d.weight [w, 1, W], cross-correlation over the left-padded input (weight[k]
#     multiplies x_{t-W+1+k}); gemkit's Conv1D.kernel[j] multiplies x_{t-j}: reversed
#   log a = -8 r softplus(recurrent_param) = -c r softplus(-Lambda): a_param = -recurrent_param
#   input/recurrent gate weights [H, w/H, w/H] (x @ W per block) and biases [H, w/H]: as is
#   attention: partial rotary (partial_rotary_factor, 0.5) -> rope_fraction; q/k/v biases
#     by attention_bias -> qkv_bias; o_proj always biased -> out_bias; the window mask
#     kv > q - attention_window_size is gemkit's i - j < window
#   logits_soft_cap -> logits_softcap; block_types (cyclic) -> block_pattern R / A
# head_dim is always hidden_size // num_attention_heads (the config's own head_dim key is
# recomputed by transformers); embeddings_scale_by_sqrt_dim is ignored by transformers
# (it always scales) and here.

RG_NAME = "RecurrentGemmaForCausalLM"
RG_BLOCKS = {"recurrent": "R", "attention": "A"}
RG_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")   # the tanh GeLU


def _bf16(x: float) -> float:
  """x rounded to bfloat16 (transformers keeps the embedding normaliser in bf16)."""
  return float(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16))


def _rg_config(hf: Mapping[str, Any]) -> dict:
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  types = list(hf.get("block_types") or ("recurrent", "recurrent", "attention"))
  for t in types:
    if t not in RG_BLOCKS:
      raise ValueError(f"block_types entry {t!r} is not supported (supported: "
                       f"{', '.join(RG_BLOCKS)})")
  act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  if act not in RG_ACTIVATIONS:
    raise ValueError(f"hidden_activation {act!r} is not supported (Griffin's GeLU: "
                     f"{', '.join(RG_ACTIVATIONS)})")
  rope = dict(hf.get("rope_parameters") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default" or hf.get("rope_scaling"):
    raise ValueError(f"rope_parameters: rope type {kind!r} is not supported "
                     "(RecurrentGemma has default RoPE only)")
  cap = hf.get("logits_soft_cap", 30.0)
  if not cap or cap <= 0:
    raise ValueError(f"logits_soft_cap must be > 0, got {cap!r}")
  if hf.get("intermediate_size", 0) % 2:
    raise ValueError(f"intermediate_size must be even (the MLP is intermediate_size // 2 "
                     f"wide), got {hf['intermediate_size']}")
  values = {
      "vocab_size": hf["vocab_size"], "num_layers": hf["num_hidden_layers"], "d_model": d,
      "mlp_dim": hf["intermediate_size"] // 2, "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": d // heads,
      "lru_width": hf.get("lru_width") or d,
      "window": int(hf.get("attention_window_size", 2048)),
      "conv_width": int(hf.get("conv1d_width", 4)),
      "block_pattern": "".join(RG_BLOCKS[t] for t in types),
      "logits_softcap": float(cap), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
      "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
      "rope_fraction": float(rope.get("partial_rotary_factor",
                                      hf.get("partial_rotary_factor", 0.5))),
      "embed_scale": _bf16(math.sqrt(d)), "norm_offset": 1.0, "mlp_bias": True,
      "recurrent_bias": True, "qkv_bias": bool(hf.get("attention_bias", False)),
      "out_bias": True}
  return dataclasses.asdict(griffin.GriffinConfig.from_config(values)) | {"family": "griffin"}


def _rg_json(cfg) -> dict:
  return {"architectures": [RG_NAME], "model_type": "recurrent_gemma",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": 2 * cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "lru_width": cfg.width,
          "attention_window_size": cfg.window, "conv1d_width": cfg.conv_width,
          "logits_soft_cap": cfg.logits_softcap, "rms_norm_eps": cfg.norm_eps,
          "hidden_activation": "gelu_pytorch_tanh",
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                              "partial_rotary_factor": cfg.rope_fraction},
          "block_types": ["recurrent" if k == "R" else "attention"
                          for k in cfg.block_pattern],
          "attention_bias": cfg.qkv_bias, "tie_word_embeddings": cfg.tie_embeddings,
          "dtype": cfg.param_dtype}


def _rg_unsupported(cfg) -> str | None:
  if getattr(cfg, "family", None) != "griffin":
    return f"{RG_NAME} is a griffin model"
  if cfg.head_dim != cfg.d_model // cfg.num_heads:
    return (f"{RG_NAME} has head_dim = hidden_size // num_heads = "
            f"{cfg.d_model // cfg.num_heads}, this model {cfg.head_dim}")
  scale, want = cfg.embed_scale or math.sqrt(cfg.d_model), _bf16(math.sqrt(cfg.d_model))
  if not math.isclose(scale, want, rel_tol=1e-6):
    return f"{RG_NAME} scales embeddings by bf16(sqrt(d)) = {want:g}, this model by {scale:g}"
  if cfg.logits_softcap <= 0:
    return f"{RG_NAME} always soft-caps its logits (logits_softcap > 0)"
  if not cfg.mlp_dim:
    return f"{RG_NAME} always has an MLP"
  for flag in ("mlp_bias", "recurrent_bias", "out_bias"):
    if not getattr(cfg, flag):
      return f"{RG_NAME} always has {flag}"
  return None


def _rg_tensors(cfg) -> list[Tensor]:
  shift = cfg.norm_offset - 1.0
  neg = lambda a: -a
  t = [Tensor("model.embed_tokens.weight", ("embed", "embedding")),
       Tensor("model.final_norm.weight", ("final_norm", "scale"), shift=shift)]
  if not cfg.tie_embeddings:
    t.append(Tensor("lm_head.weight", ("head", "kernel"), transpose=True))

  def linear(name, path, bias=True):
    out = [Tensor(f"{name}.weight", path + ("kernel",), transpose=True)]
    return out + ([Tensor(f"{name}.bias", path + ("bias",))] if bias else [])

  for i, kind in enumerate(cfg.block_types):
    pre, at = f"model.layers.{i}", ("blocks", i)
    blk, mix = f"{pre}.temporal_block", at + ("mixer",)
    t += [Tensor(f"{pre}.temporal_pre_norm.weight", at + ("mix_norm", "scale"), shift=shift),
          Tensor(f"{pre}.channel_pre_norm.weight", at + ("mlp_norm", "scale"), shift=shift)]
    for p in ("gate_proj", "up_proj", "down_proj"):
      t += linear(f"{pre}.mlp_block.{p}", at + ("mlp", p), cfg.mlp_bias)
    if kind == "R":
      for p in ("linear_x", "linear_y", "linear_out"):
        t += linear(f"{blk}.{p}", mix + (p,), cfg.recurrent_bias)
      lru = mix + ("rg_lru",)
      t += [Tensor(f"{blk}.conv_1d.weight", mix + ("conv", "kernel"),
                   to_gemkit=lambda a: np.ascontiguousarray(a[:, 0, ::-1].T),
                   to_hf=lambda k: np.ascontiguousarray(k[::-1].T[:, None, :])),
            Tensor(f"{blk}.conv_1d.bias", mix + ("conv", "bias")),
            Tensor(f"{blk}.rg_lru.recurrent_param", lru + ("a_param",), to_gemkit=neg,
                   to_hf=neg)]
      for hf_gate, ours in (("input_gate", "input_gate"), ("recurrent_gate", "recurrence_gate")):
        t += [Tensor(f"{blk}.rg_lru.{hf_gate}_weight", lru + (ours, "kernel")),
              Tensor(f"{blk}.rg_lru.{hf_gate}_bias", lru + (ours, "bias"))]
    else:
      for p in ("q_proj", "k_proj", "v_proj"):
        t += linear(f"{blk}.{p}", mix + ("attn", p), cfg.qkv_bias)
      t += linear(f"{blk}.o_proj", mix + ("attn", "o_proj"), cfg.out_bias)
  return t


RECURRENT_GEMMA = Architecture(RG_NAME, "recurrent_gemma", _rg_config, _rg_json,
                               _rg_unsupported, _rg_tensors)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in DECODERS + (RECURRENT_GEMMA,)}


def register(arch: Architecture, *, first: bool = False) -> None:
  """Adds an architecture (``first``: tried before the others on export)."""
  global ARCHITECTURES
  ARCHITECTURES = ({arch.name: arch} | ARCHITECTURES) if first else ARCHITECTURES | {
      arch.name: arch}


def of_config_json(hf: Mapping[str, Any], where: str) -> Architecture:
  """The architecture a ``config.json`` names; a ValueError lists the supported ones."""
  names = hf.get("architectures") or []
  for name in names:
    if name in ARCHITECTURES:
      return ARCHITECTURES[name]
  raise ValueError(f"{where}: architecture {names[0] if names else None!r} is not supported "
                   f"(supported: {', '.join(sorted(ARCHITECTURES))})")


def for_model(cfg) -> Architecture:
  """The first architecture that can express gemkit config ``cfg`` (export)."""
  reasons = []
  for arch in ARCHITECTURES.values():
    why = arch.unsupported(cfg)
    if why is None:
      return arch
    reasons.append(why)
  raise ValueError("no Hugging Face architecture can hold this model: " + "; ".join(reasons))
