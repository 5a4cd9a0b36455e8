"""Shared test helpers: kernel cross-lowering and race checks (tests/ops), and
small configs and corpora for fast framework tests (tests/gemkit, tests/models).

This module imports jax only at the top: tests/ops must import on a machine
that has jax, numpy, pytest and chex but not gemkit's other dependencies (the
accelerator run, benchmarks/accel.sh), so gemkit is imported inside the
functions that need it.
"""

import pathlib

import jax

# The custom call that marks a Pallas kernel in a lowered module, per platform.
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
_PLATFORM_OF_IMPL = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}


def cross_lower(target: str, fn, *avals, expect_kernel: bool = True):
  """Lowers ``jax.jit(fn)`` for a TPU or a CUDA GPU on any machine (nothing runs).

  The JAX-side Mosaic / Triton lowering runs, so this catches what interpret
  mode ignores: the TPU (8, 128) block rule, Triton's power-of-two rule, a
  primitive with no lowering (DESIGN.md "Tests and numerics").

  Args:
    target: ``"tpu"`` / ``"cuda"``, or the impl ``"pallas_tpu"`` / ``"pallas_gpu"``.
    fn: the function; the ops in it are called with ``interpret=False``.
    *avals: ``jax.ShapeDtypeStruct``s (or arrays, pytrees) of its arguments.
    expect_kernel: also assert that the lowered module holds the kernel's
      custom call (a call that fell back to XLA fails).

  Returns:
    The ``jax.export.Exported``.
  """
  platform = _PLATFORM_OF_IMPL.get(target, target)
  if platform not in KERNEL_CALL:
    raise ValueError(f"target must be one of {sorted(_PLATFORM_OF_IMPL)} or "
                     f"{sorted(KERNEL_CALL)}, got {target!r}")
  # Triton kernels are a custom call that jax.export does not vouch for.
  checks = ([jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])]
            if platform == "cuda" else [])
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=checks)(*avals)
  if expect_kernel:
    assert KERNEL_CALL[platform] in exported.mlir_module(), (
        f"no {KERNEL_CALL[platform]} in the {platform} lowering: the call did not "
        "reach the kernel")
  return exported


def races_found() -> bool:
  """Whether the last TPU-interpret kernel run reported a race (PALLAS_NOTES
  §1: the detector's state is per run, so check right after the kernel)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  return bool(interpret_pallas_call.races.races_found)


TINY = {
    "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.head_dim": 16, "model.mlp_dim": 128,
    "data.seq_len": 32, "data.eval_windows": 8, "data.prefetch": 1,
    "train.batch_size": 8, "train.steps": 8, "train.warmup_steps": 2,
    "train.log_every": 2, "train.eval_every": 1000, "train.checkpoint_every": 4,
    "train.async_checkpoint": False, "train.sample_tokens": 8,
    "train.compilation_cache_dir": "",      # tests leave the user's cache alone
    "train.min_lr_ratio": 0.1,   # steps past the schedule still update (lm_tiny decays to 0)
}


def write_corpus(directory: pathlib.Path, n_docs: int = 40) -> str:
  """A text corpus of n_docs small files; returns the comma-separated paths."""
  paths = []
  for i in range(n_docs):
    p = directory / f"doc{i:03d}.txt"
    p.write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)))
    paths.append(str(p))
  return ",".join(paths)


def latest_params(workdir: pathlib.Path):
  """(step, params as saved) of the newest checkpoint of the run in ``workdir``."""
  from gemkit import checkpoint  # pylint: disable=g-import-not-at-top
  with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as ck:
    step = ck.latest_step()
    return step, ck.restore(step)["params"]


def tiny_config(tmp_path: pathlib.Path | None = None, **overrides):
  """lm_tiny shrunk to seconds; on a small text corpus when tmp_path is given."""
  values = dict(TINY)
  if tmp_path is not None:
    values.update({"data.source": "text", "data.path": write_corpus(tmp_path),
                   "data.heldout_fraction": 0.1})
  values.update(overrides)
  from gemkit import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load("experiments/lm_tiny.py", **values)
