"""A small byte-level gated-linear-attention LM (Yang et al. 2024) on the Python stdlib.

  python -m launch.train --config=experiments/gla_tiny.py

Data, optimizer and schedule as experiments/lm_tiny.py.
"""

import ml_collections

from experiments import lm_tiny


def linear_rnn_model(mixer: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.family = "linear_rnn"
  m.vocab_size = 384
  m.num_layers = 4
  m.d_model = 256
  m.mlp_dim = 768
  m.mixer = mixer                   # gla | deltanet | gated_deltanet | mamba
  m.num_heads = 4
  m.head_dim = 64                   # key and value dim per head
  m.eigenvalue_range = "[0,1]"      # "[-1,1]": beta -> 2 beta (DeltaNet), a -> 2a - 1 (mamba)
  m.conv_width = 4                  # short causal conv on q, k, v (0: none)
  m.state_dim = 16                  # mamba: states per channel
  m.expand = 2                      # mamba: inner width = expand * d_model
  m.gate_rank = 16                  # GLA: rank of the decay gate
  m.chunk_size = 64
  m.logits_softcap = 0.0
  m.tie_embeddings = True
  m.norm_eps = 1e-6
  m.dropout_rate = 0.0
  m.dtype = "float32"
  m.param_dtype = "float32"
  m.remat = False
  m.scan_impl = "auto"
  return m


def get_config() -> ml_collections.ConfigDict:
  c = lm_tiny.get_config()
  c.name = "gla_tiny"
  c.model = linear_rnn_model("gla")
  return c
