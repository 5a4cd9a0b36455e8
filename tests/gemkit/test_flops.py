"""Model FLOPs per token (gemkit.flops) against counts written out by hand, and the
Trainer's MFU fields."""

import dataclasses

import pytest
from flax import nnx

import models
from gemkit import flops, metrics, train
from gemkit.surgery import lora
from models import transformer
from tests.helpers import tiny_config


def _cfg(**kw):
  base = dict(vocab_size=300, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=96, block_size=64)
  return transformer.TransformerConfig(**(base | kw))


def _model(cfg):
  values = dataclasses.asdict(cfg) | {"family": "transformer"}
  return nnx.eval_shape(lambda: models.build(values, rngs=nnx.Rngs(0)))


def _matmuls(c):
  per_layer = (c.d_model * c.num_heads * c.head_dim * 2          # q, o
               + 2 * c.d_model * c.num_kv_heads * c.head_dim      # k, v
               + 3 * c.d_model * c.mlp_dim)                       # gate, up, down
  return 2 * (c.num_layers * per_layer + c.d_model * c.vocab_size)   # + tied head


def test_dense_transformer_counts_every_matmul_and_the_full_score_matrix():
  c = _cfg()
  attention = c.num_layers * 4 * c.num_heads * c.head_dim * 256
  assert flops.forward_flops_per_token(_model(c), 256) == _matmuls(c) + attention
  assert flops.train_flops_per_token(_model(c), 256) == 3 * (_matmuls(c) + attention)


@pytest.mark.parametrize("kw,keys", [
    # window 64 in blocks of 64: the first query block sees 1 block, the others 2.
    (dict(attention="sliding", window=64), (1 + 2 + 2 + 2) / 4 * 64),
    # top-k 1 + local + sink = 3 blocks, fewer where causality leaves fewer: 1, 2, 3, 3.
    (dict(attention="topk", top_k=1), (1 + 2 + 3 + 3) / 4 * 64),
    (dict(attention="topk", top_k=1, compressed_branch=True),
     (1 + 2 + 3 + 3) / 4 * 64 + 4),
])
def test_sparse_patterns_count_only_their_computed_blocks(kw, keys):
  c = _cfg(**kw)
  assert flops.attended_keys(c, 256) == keys
  gate = 2 * c.d_model * c.num_heads * c.num_layers if c.compressed_branch else 0
  assert flops.forward_flops_per_token(_model(c), 256) == pytest.approx(
      _matmuls(c) + gate + c.num_layers * 4 * c.num_heads * c.head_dim * keys)


def test_adapters_add_their_matmuls():
  c = _cfg()
  model = models.build(dataclasses.asdict(c) | {"family": "transformer"}, rngs=nnx.Rngs(0))
  before = flops.forward_flops_per_token(model, 128)
  lora.apply_lora(model, {"targets": r".*q_proj", "rank": 4})
  q_in, q_out = c.d_model, c.num_heads * c.head_dim
  assert flops.forward_flops_per_token(model, 128) == before + c.num_layers * 2 * 4 * (
      q_in + q_out)


def test_trainer_logs_model_flops_and_says_when_no_peak_is_known(tmp_path):
  trainer = train.Trainer(tiny_config(tmp_path, **{"train.steps": 2, "train.log_every": 1}),
                          tmp_path / "run")
  try:
    logged = [r for r in trainer.run() if r["split"] == "train"]
  finally:
    trainer.close()
  assert trainer.flops_per_token == flops.train_flops_per_token(
      trainer.model(), trainer.config.data.seq_len)
  for r in logged:
    assert r["model_flops_per_sec"] == pytest.approx(r["tokens_per_sec"]
                                                     * trainer.flops_per_token)
    assert r["mfu"] is None            # a CPU: no peak FLOP/s is known
  assert metrics.peak_flops() is None
  assert "MFU n/a" in metrics.format_flops(1e12, None)
  assert metrics.format_flops(2e12, 0.25) == "2 TFLOP/s MFU 25.0%"
