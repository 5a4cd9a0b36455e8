"""Passkey retrieval with dense, top-k block and sliding-window attention.

The task is ``gemkit.synthetic.Passkey`` on a span of the default corpus
(Python stdlib sources, bytes): a pass key planted at a random depth, asked
for at the end, each copy of it after ``passkey.mark``::

  BOS  haystack[:a]  "\\nThe pass key is $K. Remember it. $K is the pass key.\\n"
       haystack[a:]  "\\nWhat is the pass key? The pass key is $"  "K."

Digit i of the 5-digit key K is written as the byte ``key_offset +
key_stride * i + d`` (default 128 + 10 i + d: one alphabet per position, bytes
the haystack never holds, as its bytes >= 128 become "?"), so each answer
digit is one content lookup ("the symbol of alphabet i") rather than an
induction chain over the ~7 copies of each ASCII digit in 4K bytes of
source code (with ASCII keys this model never got past 0 whole keys).

``benchmarks/passkey.py`` trains one byte-level transformer per pattern of
``passkey.patterns`` and prints retrieval accuracy and time per training
step (README "Sparse attention"):

1. shared, dense, ``passkey.pretrain`` stages (256 then 1K bytes): the model
   learns the byte LM and the lookup. ``rope_theta`` = 1e6 keeps the
   lookup content-based: at 10,000 the model trained to 896 bytes found the
   first digit of 0.25 of keys at 4K; at 1e6 the one trained to 1K finds all.
2. per pattern, from the shared weights, ``train.steps`` steps at
   ``data.seq_len`` = 4K bytes (one row per step) with the pattern on.

Then each model is asked for held-out keys at ``eval_lens`` bytes.

Patterns, all with the same key budget per query block at 4K bytes (blocks
of 16): the ``topk*`` patterns keep ``top_k`` = 62 selected blocks plus a
local and a sink block, 64 of 256 (1/4); ``sliding`` keeps a window of 1,024
keys. They differ in how a query block ranks the kv blocks:

- ``topk``: block-mean query against block-mean key (MoBA's gate averaged
  over the query block), as the issue specifies.
- ``topk_quest``: Quest's bound ``sum_d max(q_d kmin_d, q_d kmax_d)`` per
  query row, summed over the block's rows and the GQA group
  (``ops.attention.quest_scores``), the criterion decode pages use too.
- ``topk_quest_nsa``: the same, plus NSA's compressed branch (mean pooling,
  ``models.transformer.compressed_attention``) added through a gate.
- ``topk_nsa``: the compressed branch's probabilities rank the blocks.

Block sizes matter: with blocks of 64 (keep 16 of 64) the key's few bytes
are 1/10 of a block mean and ``topk_nsa`` reached 0.38 of first digits
after 450 steps at 4K; with blocks of 16 it reached 0.81 after 200.

Deviations from the issue, forced by a 2-core CPU: a 2-layer model with
d_model 128; training contexts up to 4K bytes (evaluation at 4K and 8K,
where the fixed ``top_k`` keeps 1/8 of the blocks).
"""

from __future__ import annotations

import ml_collections

from experiments import lm_tiny


def get_config() -> ml_collections.ConfigDict:
  c = lm_tiny.get_config()
  c.name = "passkey"
  c.seed = 0
  m = c.model
  m.num_layers = 2
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 32
  m.mlp_dim = 384
  m.rope_theta = 1e6                # slow rotations: a content lookup that holds over 4K+
  m.attention = "dense"             # set per pattern by benchmarks/passkey.py
  m.block_size = 16
  m.top_k = 62                      # + 1 local + 1 sink = 64 of the 256 blocks of 4K bytes
  m.local_blocks = 1
  m.sink_blocks = 1
  m.topk_scores = "mean"            # set per pattern (topk: mean, topk_nsa: compressed)
  m.query_block = 0                 # topk: query rows per selection (0: block_size)
  m.window = 1024                   # sliding: as many keys as top-k keeps

  c.data.seq_len = 4096             # stage 2 training context (bytes)
  c.train.steps = 300               # stage 2 steps per pattern
  c.train.batch_size = 1
  c.train.lr = 2e-3
  c.train.warmup_steps = 5
  c.train.log_every = 10

  c.passkey = ml_collections.ConfigDict()
  c.passkey.patterns = "dense,topk_quest,topk_quest_nsa,topk,sliding"  # benchmarks/passkey.py
  c.passkey.digits = 5
  c.passkey.mark = "$"              # before every key: a byte rare in the corpus (0.07 per 2K)
  c.passkey.distinct_digits = False  # True: keys of 5 different digits
  c.passkey.key_offset = 128        # digit d at position i of the key is the byte
  c.passkey.key_stride = 10         #   key_offset + key_stride * i + d (48, 0: ASCII)
  c.passkey.min_len = 0             # > 0: rows packed with documents of min_len..len bytes
  c.passkey.lm_weight = 1.0         # loss weight of the haystack bytes
  c.passkey.train_questions = 1     # extra question-answer pairs after the needle (training)
  c.passkey.answer_weight = 50.0    # loss weight of each key byte to copy
  # Stage 1 (shared, dense): "BYTESxROWSxSTEPS" per stage, comma-separated ("": none).
  c.passkey.pretrain = "256x8x300,1024x4x300"
  c.passkey.pretrain_lr = 3e-3
  c.passkey.probe_every = 100       # stage 1: held-out accuracy at its length every N steps
  c.passkey.eval_lens = "4096,8192"  # held-out context lengths (bytes)
  c.passkey.eval_examples = 24      # per length, depths spread evenly over [0, 1]
  c.passkey.eval_batch = 4
  return c

