"""A ~100M-parameter byte-level LM for one GPU or a TPU slice.

  python -m launch.train --config=experiments/lm_100m.py --workdir=runs/lm_100m

bf16 compute with float32 parameters and optimizer state; FSDP over all
devices. Not measured in this repository (no accelerator in CI).
"""

from experiments import lm_tiny


def get_config():
  c = lm_tiny.get_config()
  c.name = "lm_100m"
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 3072
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.data.seq_len = 1024
  c.data.eval_windows = 256
  c.train.steps = 20_000
  c.train.batch_size = 64
  c.train.lr = 1e-3
  c.train.warmup_steps = 1000
  c.train.schedule = "wsd"
  c.train.decay_fraction = 0.2
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.log_every = 50
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
