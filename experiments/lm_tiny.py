"""Default experiment: a small byte-level transformer LM on the Python stdlib.

Sized to train in under 8 minutes on 2 CPU cores (see README for the
measured figures). ``python -m launch.train`` runs it.

The recipe is compute-optimal-ish for that budget rather than model-sized: a
0.84M-parameter model (d_model 128, 4 layers) seeing 4.9M tokens in 2,400
small-batch steps (8 x 256) beats the earlier 3.2M-parameter d256 model that
saw 1.5M tokens in 360 steps of 16 x 256 (1.995 bits/byte in 8 min 08 s): on
2 CPU cores the small model runs about 4.6x the tokens per second. Trials at
a fixed step count (issue 19; held-out bits/byte): d192 / 3 heads, 960 steps
of 8 x 256 at lr 4e-3: 1.908; d128, 1,500 steps: lr 4e-3 1.810, lr 5e-3
1.802, lr 7e-3 with decay_fraction 0.4 1.854; d128, 1,600 steps, lr 5e-3
decaying to zero: 1.8005.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "lm_tiny"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.family = "transformer"
  c.model.init_from = ""            # a Hugging Face model directory: its architecture and
                                    # weights (gemkit.hf; the keys below then set only
                                    # dtypes, remat, impls, dropout and sparse patterns)
  c.model.vocab_size = 384          # 256 bytes + PAD/BOS/EOS, padded to a multiple of 128
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 64
  c.model.mlp_dim = 384
  c.model.rope_theta = 10_000.0
  c.model.tie_embeddings = True
  c.model.norm_eps = 1e-6
  c.model.dropout_rate = 0.0
  c.model.attention = "dense"       # dense | sliding | s2 | topk | global (models/transformer.py)
  c.model.window = 0                # keys i-window+1..i (sliding, global)
  c.model.block_size = 128          # block-sparse attention blocks (sliding, s2, topk, global)
  c.model.top_k = 0                 # topk: selected kv blocks per query block
  c.model.local_blocks = 1          # topk: kv blocks ending at the query block, always kept
  c.model.sink_blocks = 1           # topk: first kv blocks, always kept
  c.model.topk_scores = "mean"      # topk: rank blocks by "mean" keys, "quest" bounds, "compressed"
  c.model.compressed_branch = False  # topk: add NSA's gated compressed-attention output
  c.model.query_block = 0           # topk: query rows sharing one selection (0: block_size)
  c.model.s2_group = 0              # s2: LongLoRA S2-Attn group size (training only)
  c.model.global_tokens = 0         # global: first tokens seen by and seeing all
  c.model.attention_impl = "auto"   # ops.attention impl: auto | xla | pallas_tpu | pallas_gpu
  c.model.dtype = "float32"         # compute dtype; "bfloat16" on GPU/TPU
  c.model.param_dtype = "float32"
  c.model.remat = False

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"          # stdlib | text | jsonl
  c.data.path = ""                  # comma-separated files for text / jsonl
  c.data.jsonl_field = "text"
  c.data.seq_len = 256
  c.data.heldout_fraction = 0.05
  c.data.eval_windows = 256         # held-out windows of seq_len per evaluation (evenly spread)
  c.data.prefetch = 2

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2400
  c.train.batch_size = 8
  c.train.grad_accum = 1
  c.train.lr = 5e-3
  c.train.min_lr_ratio = 0.0
  c.train.warmup_steps = 50
  c.train.schedule = "wsd"          # cosine | wsd | constant
  c.train.decay_fraction = 0.3      # WSD: last fraction of steps decays
  c.train.wsd_decay = "sqrt"        # linear | cosine | exp | sqrt
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.max_nonfinite_steps = 10  # skipped NaN/inf steps in a row before stopping; 0: never
  c.train.log_every = 50
  c.train.eval_every = 1200          # mid-run and final held-out evaluation
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.async_checkpoint = True
  c.train.tensorboard = False
  c.train.compilation_cache_dir = "auto"  # compiled steps kept across runs: "auto" (the user's
                                    # cache dir), a path (relative: under the workdir), "": off
  c.train.sample_prompt = "def "
  c.train.sample_tokens = 120

  # Mesh axis = per-slice (ICI) size x cross-slice (DCN) size; see gemkit/sharding.py.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1: the devices of a slice left over
  c.mesh.fsdp = 1
  c.mesh.sequence = 1               # splits data.seq_len (model families that support it)
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1               # across TPU slices (or processes, on GPU/CPU); -1: the rest
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_sequence = 1
  c.mesh.dcn_tensor = 1
  return c
