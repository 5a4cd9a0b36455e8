"""Tiny random Hugging Face checkpoints and a real BPE tokenizer, built locally
(tests only: torch, transformers and tokenizers must be installed)."""

import json
import pathlib

import tokenizers
import torch
import transformers

VOCAB = 301
EOS = 2
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
ARCHS = {
    "llama": ("Llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_tied_bias": ("Llama", dict(tie_word_embeddings=True, attention_bias=True,
                                      mlp_bias=True, head_dim=16)),
    "mistral": ("Mistral", dict(sliding_window=6)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict()),
    "gemma": ("Gemma", dict()),
    "gemma2": ("Gemma2", dict(sliding_window=6, query_pre_attn_scalar=20,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Über Größe: straße, Äpfel.",
         "机器学习很有趣。", "مرحبا بالعالم", "emoji 🚀✨ and\ttabs\nnew lines",
         "def f(x):\n    return x * 2  # code"]


def write_tokenizer(directory: pathlib.Path) -> None:
  """A byte-level BPE tokenizer.json trained on TEXTS, with its config files."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 4, trainer)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
       "tokenizer_class": "PreTrainedTokenizerFast"}))


def perturb(model) -> None:
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.3)


def save_tiny_hf(name: str, directory: pathlib.Path, **save_kw):
  family, extra = ARCHS[name]
  torch.manual_seed(sum(map(ord, name)))
  cfg = getattr(transformers, family + "Config")(**(COMMON | extra))
  model = getattr(transformers, family + "ForCausalLM")(cfg).eval()
  perturb(model)
  model.save_pretrained(directory, **save_kw)
  write_tokenizer(directory)
  return model
