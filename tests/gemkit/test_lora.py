"""gemkit.surgery.lora: exact starts, frozen bases, merge/unmerge, adapter checkpoints, QLoRA gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from gemkit import data, train
from gemkit.surgery import lora, paths, quantize
from gemkit.studies import finetune
from gemkit.config import ConfigError
from ops import quant
from tests.helpers import tiny_config
from tests.numerics import rel_err

CFG = tiny_config()
TOKENS = jax.random.randint(jax.random.key(1), (2, 24), 0, 259)
logits = nnx.jit(lambda m, t: m(t))


def _base(seed=0, **overrides):
  return models.build(tiny_config(**overrides).model if overrides else CFG.model,
                      rngs=nnx.Rngs(seed))


def _perturb(model, seed=3):
  """Gives every adapter parameter random values (a trained adapter)."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  return model


def _kernels(model):
  return {p: np.asarray(d.kernel[...]) for p, d in paths.dense_layers(model)}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_standard_init_equals_the_base_bit_for_bit(dora, quantized):
  base = _base()
  if quantized:
    base, _ = quantize.quantize_model(base, quantize.default_rules("nf4-g32"))
  expected = logits(base, TOKENS)
  adapted = lora.apply_lora(nnx.clone(base), lora.LoRARule("all-linear", rank=4, dora=dora))
  assert len(lora.wrappers(adapted)) == 14
  np.testing.assert_array_equal(logits(adapted, TOKENS), expected)


def test_pissa_starts_at_the_base_and_freezes_the_residual():
  base = _base()
  w = _kernels(base)
  adapted = lora.apply_lora(nnx.clone(base), lora.LoRARule(r".*attn\.(q|v)_proj", rank=4,
                                                           init="pissa"))
  assert rel_err(logits(adapted, TOKENS), logits(base, TOKENS)) < 1e-5
  for path, wrapper in lora.wrappers(adapted):
    a = wrapper.adapters["default"]
    residual = np.asarray(wrapper.base.kernel[...])
    principal = np.asarray(a.delta(), np.float64)
    np.testing.assert_allclose(residual + principal, w[path], atol=1e-5)
    # The rank-4 principal part is W's best rank-4 approximation (its top singular values).
    s = np.linalg.svd(w[path].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(principal, compute_uv=False)[:4], s[:4], rtol=1e-4)


def test_rules_select_by_full_regex_in_either_spelling_and_typos_fail():
  model = lora.apply_lora(_base(), [lora.LoRARule(r".*attn\.(q|k|v|o)_proj", rank=2),
                                    {"targets": r".*/mlp/down_proj", "rank": 3}])
  paths = {p: w.adapters["default"].rule.rank for p, w in lora.wrappers(model)}
  assert len(paths) == 10 and paths["blocks/1/attn/k_proj"] == 2
  assert paths["blocks/0/mlp/down_proj"] == 3
  untied = lora.apply_lora(_base(**{"model.tie_embeddings": False}), lora.LoRARule())
  assert "head" not in dict(lora.wrappers(untied)) and len(lora.wrappers(untied)) == 14
  with pytest.raises(ValueError, match=r"matched no Dense layer.*blocks/0/attn"):
    lora.apply_lora(_base(), lora.LoRARule(r".*atn\.q_proj"))
  with pytest.raises(ValueError, match="rank 65 exceeds min"):
    lora.apply_lora(_base(), lora.LoRARule(rank=65))
  with pytest.raises(ValueError, match="init must be one of"):
    lora.LoRARule(init="gaussian")
  trainable, total = lora.count(model)
  assert trainable == 2 * (2 * 2 * (64 + 64) + 2 * 2 * (64 + 32) + 3 * (128 + 64))
  assert total == train.count_params(nnx.state(_base(), nnx.Param)) + trainable


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_forward_equals_unmerged_and_unmerge_restores(dora):
  base = _base()
  w = _kernels(base)
  model = _perturb(lora.apply_lora(nnx.clone(base), lora.LoRARule(rank=4, dora=dora)))
  unmerged = np.asarray(logits(model, TOKENS), np.float64)
  assert rel_err(unmerged, logits(base, TOKENS)) > 1e-2          # the adapter does something
  lora.merge(model)
  assert all(wr.merged == "default" for _, wr in lora.wrappers(model))
  assert rel_err(logits(model, TOKENS), unmerged) < 1e-5
  plain = lora.unwrap(nnx.clone(model))                            # adapter-free serving
  assert not lora.wrappers(plain) and rel_err(logits(plain, TOKENS), unmerged) < 1e-5
  lora.unmerge(model)
  for path, wr in lora.wrappers(model):
    np.testing.assert_allclose(wr.base.kernel[...], w[path], rtol=0, atol=2e-6)
  assert rel_err(logits(model, TOKENS), unmerged) < 1e-5


def _quantized_and_dequantized(rule):
  q, _ = quantize.quantize_model(_base(), quantize.default_rules("nf4-g32"))
  f = nnx.clone(q)
  for _, d in paths.dense_layers(f):            # the same weights, held in float
    w = quant.dequantize(d.quantized_weight())
    d.quantized, d.kernel = None, nnx.data(nnx.Param(w))
  return _perturb(lora.apply_lora(q, rule)), _perturb(lora.apply_lora(f, rule))


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_adapter_gradients_equal_the_dequantized_float_base(dora):
  q, f = _quantized_and_dequantized(lora.LoRARule(rank=4, dora=dora))
  assert not lora.wrappers(f)[0][1].base.is_quantized

  def grads(model):
    graphdef, params, frozen = train.split_model(model, nnx.LoRAParam)

    def loss(params):
      out = train.merge_model(graphdef, params, frozen)(TOKENS[:, :-1])
      return jnp.mean(train.token_nll(out, TOKENS[:, 1:]))
    return jax.jit(jax.grad(loss))(params)

  gq, gf = grads(q), grads(f)
  a = gq["blocks"][0]["attn"]["q_proj"]["adapters"]["default"]["a"]   # reached through 2 layers
  assert np.abs(a).max() > 0
  for x, y in zip(jax.tree.leaves(gq), jax.tree.leaves(gf)):
    assert rel_err(x, y) < 1e-5


def test_training_moves_only_adapters_and_resumes_exactly(tmp_path):
  cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2,
                                 "train.weight_decay": 0.1})
  task = finetune.TaskData(
      [data.Completion.from_text(f"{i}+{i}=", str(2 * i)) for i in range(40)],
      [data.Completion.from_text(f"{i}+1=", str(i + 1)) for i in range(8)], 32, {"kind": "t"})
  before = jax.device_get(nnx.to_pure_dict(nnx.state(_base())))
  rule = lora.LoRARule(rank=2, dropout=0.5)     # adapter dropout: the step's key, per layer

  def trainer(workdir):
    model = lora.apply_lora(_base(), rule, name="task")
    return train.Trainer(cfg, workdir, model_fn=lambda: model, trainable=lora.trainable("task"),
                         data=task, meta={"finetune": {"rule": rule.to_dict()}})

  straight = trainer(tmp_path / "a")
  assert not straight.deterministic and straight.num_trainable == lora.count(
      straight.model(), "task")[0]
  straight.run()
  straight.close()
  tuned = straight.model()
  frozen = nnx.to_pure_dict(nnx.state(lora.unwrap(nnx.clone(tuned)), nnx.Param))
  chex.assert_trees_all_equal(frozen, before)                       # every base bit unchanged
  initial = nnx.state(lora.apply_lora(_base(), rule, name="task"), nnx.LoRAParam)
  for new, old in zip(jax.tree.leaves(nnx.state(tuned, nnx.LoRAParam)), jax.tree.leaves(initial)):
    assert np.abs(np.asarray(new) - np.asarray(old)).min() > 0     # every adapter entry moved
  first = trainer(tmp_path / "b")
  first.run(steps=2)
  first.close()
  second = trainer(tmp_path / "b")
  assert second.resumed_from == 2
  second.run()
  second.close()
  chex.assert_trees_all_equal(jax.device_get(second.state.params),
                              jax.device_get(straight.state.params))
  # Dropout acts in training only: evaluation is deterministic.
  np.testing.assert_array_equal(logits(tuned, TOKENS), logits(tuned, TOKENS))


def test_adapter_checkpoint_round_trip_and_named_adapters(tmp_path):
  base = _base()
  rules = {"lora": lora.LoRARule(rank=4), "dora": lora.LoRARule(rank=2, dora=True),
           "pissa": lora.LoRARule(r".*mlp/up_proj", rank=2, init="pissa")}
  expected = {}
  for name, rule in rules.items():
    model = _perturb(lora.apply_lora(nnx.clone(base), rule, name=name))
    expected[name] = logits(model, TOKENS)
    lora.save_adapter(model, tmp_path / name, base_info={"workdir": "runs/x", "step": 7})
  for name in rules:
    loaded = lora.load_adapter(nnx.clone(base), tmp_path / name)
    np.testing.assert_array_equal(logits(loaded, TOKENS), expected[name])
  both = lora.load_adapter(nnx.clone(base), tmp_path / "lora")
  lora.load_adapter(both, tmp_path / "dora", activate=False)
  assert lora.adapter_names(both) == ["dora", "lora"]
  np.testing.assert_array_equal(logits(both, TOKENS), expected["lora"])
  np.testing.assert_array_equal(logits(lora.set_active(both, "dora"), TOKENS), expected["dora"])
  np.testing.assert_array_equal(logits(lora.set_active(both, None), TOKENS), logits(base, TOKENS))


def test_adapter_onto_the_wrong_base_is_a_one_line_error(tmp_path):
  model = _perturb(lora.apply_lora(_base(), lora.LoRARule(rank=2)))
  lora.save_adapter(model, tmp_path / "a", base_info={"workdir": "runs/base", "step": 9})
  with pytest.raises(ConfigError, match=r"blocks/0/attn/k_proj is \[64, 32\]; this base's is "
                     r"\[64, 64\]: wrong base model") as e:
    lora.load_adapter(_base(**{"model.num_kv_heads": 4}), tmp_path / "a")
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=r"trained on base [0-9a-f]{16} \(runs/base step 9\), "
                     r"but this base's fingerprint is [0-9a-f]{16}") as e:
    lora.load_adapter(_base(seed=1), tmp_path / "a")
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="no adapter checkpoint"):
    lora.load_adapter(_base(), tmp_path / "missing")


def test_completion_only_loss_mask_and_packing():
  exs = [data.Completion.from_text("ab=", "xy"), data.Completion.from_text("c=", "z"),
         data.Completion.from_text("long=", "w")]
  packed = data.PackedCompletions(exs, seq_len=12)
  assert packed.rows == [[0, 1], [2]]            # whole examples, first fit in order
  row = packed[0]
  tok = data.ByteTokenizer()
  # example 0: BOS a b = x y EOS (6 positions), example 1: BOS c = z EOS (4 positions)
  np.testing.assert_array_equal(row["segment_ids"], [1] * 6 + [2] * 4 + [0] * 2)
  np.testing.assert_array_equal(row["inputs"][:6], tok.encode("ab=xy", bos=True))
  np.testing.assert_array_equal(row["targets"][:6], tok.encode("ab=xy", eos=True))
  np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
  masked = row["targets"][row["loss_mask"] > 0]
  np.testing.assert_array_equal(masked, np.concatenate(
      [tok.encode("xy", eos=True), tok.encode("z", eos=True)]))
  with pytest.raises(ConfigError, match="takes 16 positions, more than seq_len=12"):
    data.PackedCompletions([data.Completion.from_text("a" * 10, "b" * 5)], 12)
