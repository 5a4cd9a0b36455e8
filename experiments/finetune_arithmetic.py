"""Fine-tune the default base (runs/lm_tiny_v2: lm_tiny on Python code) on addition.

Two-digit addition with the sum written least significant digit first
("$47+85=231$" for 132; Lee et al. 2023, "Teaching Arithmetic to Small
Transformers"), a task the base never saw. ``python -m launch.finetune``
runs full fine-tuning, LoRA, DoRA and QLoRA (nf4 base) for the same steps on
the same batches, for three seeds (each its own draw of the task, data order
and adapter init), and prints each figure's mean, standard deviation and
per-seed values (README "Fine-tuning" has the measured table). Held out:
1,000 distinct problems outside the training set.

The schedule is warmup-stable-decay: the task is learned in plateaus that a
run leaves at a seed-dependent step (often 500-800 here), and a cosine
decay to 1,000 steps had lowered the learning rate too far by then for some
seeds (LoRA 17.5% and QLoRA 35.7% exact match on seeds where the other
method reached 95-100%; with WSD the same seeds reached 99.2% and 95.4%).
"""

import ml_collections

from experiments import lm_tiny


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "finetune_arithmetic"
  c.seed = 0
  c.seeds = 3                          # seeds seed .. seed + seeds - 1, summarised
  c.methods = "full,lora,dora,qlora"   # any of full, lora, dora, qlora, pissa

  c.base = ml_collections.ConfigDict()
  c.base.workdir = "runs/lm_tiny_v2"   # a launch.train run directory
  c.base.step = 0                      # 0: its latest checkpoint

  c.model = ml_collections.ConfigDict()
  c.model.init_from = ""               # a Hugging Face model directory as the base instead

  c.task = ml_collections.ConfigDict()
  c.task.kind = "arithmetic"           # arithmetic | jsonl
  c.task.digits = 2                    # operands of min_digits..digits digits
  c.task.min_digits = 2
  c.task.reverse = True                # the sum least significant digit first
  c.task.path = ""                     # jsonl: {"prompt", "completion"} lines
  c.task.eval_path = ""                # jsonl: held-out file (else a hash split)
  c.task.heldout_fraction = 0.1
  c.task.train_examples = 10000        # arithmetic: drawn once (~5,700 distinct), then epochs
  c.task.eval_examples = 1000          # held out: distinct problems none in training
  c.task.seq_len = 64                  # examples packed whole into rows of this
  c.task.prefetch = 2

  # Adapters of lora / dora / qlora / pissa: rank 8 on attention (q, v) and the MLP
  # (down_proj), 1.86% of the parameters. lm_tiny is tiny (3.3M parameters, d_model
  # 256): rank 8 on every linear layer would train 4.6% of it, over the 2% target.
  c.lora = ml_collections.ConfigDict()
  c.lora.targets = r".*attn\.(q|v)_proj|.*mlp\.down_proj"   # regex over module paths
  c.lora.rank = 8
  c.lora.alpha = 32.0                  # scaling alpha / rank = 4
  c.lora.dropout = 0.0
  c.lora.rslora = False

  c.qlora = ml_collections.ConfigDict()
  c.qlora.base_format = "nf4"          # gemkit.surgery.quantize spec of the frozen base

  c.lr = ml_collections.ConfigDict()   # peak learning rate of each method
  c.lr.full = 2e-3
  c.lr.lora = 5e-3
  c.lr.dora = 5e-3
  c.lr.qlora = 5e-3
  c.lr.pissa = 1e-3                    # not tuned

  # The pre-training loop's settings (experiments/lm_tiny.py: AdamW b1 0.9, b2 0.95, clip 1.0,
  # WSD with sqrt decay over the last 20%, the same mesh), changed where fine-tuning differs.
  lm = lm_tiny.get_config()
  c.train, c.mesh = lm.train, lm.mesh
  c.train.update(
      steps=1000,
      lr=1e-3,                         # replaced by lr.<method>
      warmup_steps=20,
      schedule="wsd",                  # warmup-stable-decay: cosine decayed too early (README)
      weight_decay=0.0,
      log_every=20,
      eval_every=100000,               # evaluated once at the end
      checkpoint_every=100,
      keep_checkpoints=1,
      async_checkpoint=False,
      sample_prompt="$12+34=",
      sample_tokens=8)
  return c
