"""State tracking (Grazzi et al. 2024): parity and mod-3 counting, train short, test long.

  python -m launch.state_tracking --config=experiments/state_tracking.py

For every modulus x mixer x eigenvalue range, a small linear-RNN stack is
trained on random bit strings of ``task.train_length`` bits with the running
count mod k as the target at every position, then scored on the answer for
fresh strings 2x, 4x and 8x longer (gemkit/studies/state_tracking.py). Sized to run
the whole grid on 2 CPU cores in under 30 minutes.

Deviations from the paper's setup (they train Mamba and DeltaNet from
flash-linear-attention on strings of 3..40 tokens and test on 40..256): one
string length, 32, with every prefix labelled (so every length 1..32 is
trained); test lengths 64, 128 and 256; a 2-layer stack of our own layers
(``models/linear_rnn.py``: short convolution, SwiGLU MLP, d_model 32), 600
AdamW steps of 32 strings. The learning rate 1e-2 was picked on parity
(3e-3 gave the same picture with DeltaNet [-1,1] at 96% for 4x and 66% for
8x; 1200 steps or training on 64 bits did not lengthen its reach). Nothing
else was tuned.
"""

import ml_collections

from experiments import gla_tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "state_tracking"
  c.seed = 0

  c.task = ml_collections.ConfigDict()
  c.task.moduli = (2, 3)                        # 2: parity
  c.task.mixers = ("mamba", "deltanet")         # the Mamba-style diagonal layer, DeltaNet
  c.task.eigenvalue_ranges = ("[0,1]", "[-1,1]")
  c.task.train_length = 32
  c.task.test_lengths = (64, 128, 256)
  c.task.eval_examples = 512

  c.model = gla_tiny.linear_rnn_model("mamba")  # mixer and eigenvalue_range set per cell
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.mlp_dim = 128
  c.model.num_heads = 2
  c.model.head_dim = 32
  c.model.state_dim = 4

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.lr = 1e-2
  c.train.min_lr_ratio = 0.1
  c.train.warmup_steps = 50
  c.train.schedule = "cosine"
  c.train.decay_fraction = 0.2                  # (wsd only)
  c.train.wsd_decay = "sqrt"
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.eps = 1e-8
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.log_every = 100
  c.train.compilation_cache_dir = "auto"  # as experiments/lm_tiny.py
  return c
