"""A small byte-level Griffin (De et al. 2024) on the Python stdlib, for CPU.

  python -m launch.train --config=experiments/griffin_tiny.py

Recurrent (RG-LRU) and local-attention blocks in the pattern R, R, A; data,
optimizer and schedule as experiments/lm_tiny.py.
"""

import ml_collections

from experiments import lm_tiny


def griffin_model(block_pattern: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.family = "griffin"
  m.vocab_size = 384
  m.num_layers = 3
  m.d_model = 256
  m.lru_width = 0                   # 0: d_model
  m.num_heads = 4                   # attention heads; blocks of the RG-LRU gates
  m.num_kv_heads = 1                # multi-query attention, as Griffin
  m.head_dim = 64
  m.mlp_dim = 768
  m.conv_width = 4
  m.window = 128                    # local attention: keys i-127..i
  m.block_pattern = block_pattern   # R: recurrent, A: local attention, cyclic over layers
  m.rope_theta = 10_000.0
  m.logits_softcap = 30.0
  m.tie_embeddings = True
  m.norm_eps = 1e-6
  m.dropout_rate = 0.0
  m.dtype = "float32"
  m.param_dtype = "float32"
  m.remat = False
  m.scan_impl = "auto"              # ops.scan impl: auto | xla | pallas_tpu | pallas_gpu
  m.block_size = 128                # local attention block (ops.attention)
  m.attention_impl = "auto"
  return m


def get_config() -> ml_collections.ConfigDict:
  c = lm_tiny.get_config()
  c.name = "griffin_tiny"
  c.model = griffin_model("RRA")
  return c
