"""Default evaluation settings for ``python -m launch.evaluate`` (``--config``).

Override any value on the command line, e.g.
``--config.passkey.context_lens=(256,512) --config.heldout.max_tokens=100000``.
Which tasks run is ``--tasks``; this file only sets how each one runs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                        # synthetic examples and bootstrap resampling
  c.bootstrap_resamples = 1000

  # heldout_bpb (disjoint windows) and heldout_bpb_sliding.
  c.heldout = ml_collections.ConfigDict()
  c.heldout.path = ""               # "": the run's held-out split; else text files (comma-separated)
  c.heldout.window = 0              # tokens per window; 0: the run's data.seq_len
  c.heldout.stride = 64             # heldout_bpb_sliding only
  c.heldout.max_tokens = 65536      # documents in order until this many tokens in all
  c.heldout.max_doc_tokens = 4096   # the first this many of each document; 0: whole documents

  # JSONL task files (gemkit/tasks.py has the schema).
  c.tasks = ml_collections.ConfigDict()
  c.tasks.max_length = 0            # cut contexts from the left to fit; 0: never cut
  c.tasks.max_new_tokens = 32       # generate_until default

  c.mqar = ml_collections.ConfigDict()
  c.mqar.num_pairs = (4, 8, 16, 32)
  c.mqar.seq_lens = (64, 128, 256, 512)    # settings with too many pairs for the length are skipped
  c.mqar.key_len = 2
  c.mqar.num_examples = 32

  c.passkey = ml_collections.ConfigDict()
  c.passkey.context_lens = (256, 512, 1024, 2048)
  c.passkey.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
  c.passkey.digits = 5
  c.passkey.num_examples = 8

  c.parity = ml_collections.ConfigDict()
  c.parity.lengths = (4, 8, 16, 32, 64, 128)
  c.parity.running = False
  c.parity.num_examples = 64

  c.modcount = ml_collections.ConfigDict()
  c.modcount.modulus = 3
  c.modcount.lengths = (4, 8, 16, 32, 64, 128)
  c.modcount.running = False
  c.modcount.num_examples = 64

  c.arithmetic = ml_collections.ConfigDict()
  c.arithmetic.digits = (1, 2, 3, 4, 5)
  c.arithmetic.reverse = False
  c.arithmetic.num_examples = 64
  return c
