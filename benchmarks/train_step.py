"""Training-step speed: gemkit's train step against the same model elsewhere.

Every implementation runs alone in its own child process (one after another,
so none shares the cores or the allocator with another) on the same random
batch [B, T+1] of byte tokens (inputs = the first T, targets = the last T):

transformer shapes (``d256``, ``d512``)
  ``plain_jax``      a textbook JAX + Flax NNX model written here: RMSNorm,
                     fused qkv, RoPE, ``jax.nn.dot_product_attention(
                     is_causal=True)``, SwiGLU, tied head, ``optax.adamw``,
                     ``nnx.jit``.
  ``gemkit``         gemkit's real step: a ``gemkit.train.Trainer`` built from
                     experiments/lm_tiny.py with this shape, its jitted step
                     (``Trainer._train_step``, what ``launch.train`` runs:
                     gradient clipping, AdamW, non-finite guard, packed
                     segments) fed the batch (one segment per row).
  ``torch_eager``, ``torch_compile``   the plain model in PyTorch (when torch
                     is installed): eager and ``torch.compile``.

Griffin shapes (``griffin256``, ``griffin512``)
  ``recurrentgemma`` Google DeepMind's ``recurrentgemma.jax.Griffin`` (linen,
                     ``gradient_checkpointing=False``) with ``optax.adamw``
                     under ``jax.jit`` (params and optimizer state donated).
  ``gemkit``         gemkit's Griffin (experiments/griffin_tiny.py set to
                     recurrentgemma's architecture: biases, RMSNorm 1 + w,
                     half RoPE, MQA, soft-capped logits) through the Trainer.

Each child times the first step (trace + compile + run), runs two warm-up
steps, then reports the median of ``--steps`` steps (each waited for) as
tokens/s (``--repeats`` runs every child that many times, interleaved, and
keeps each one's fastest run: a shared machine's load only slows a run
down), and its peak RSS (``ru_maxrss``; on a GPU also the device's peak
bytes in use). The parent prints the table with each row's speed relative to
the baseline of its shape (plain_jax; recurrentgemma for Griffin) and writes
JSON (default ``benchmarks/results/train_step_<machine>.json``) with the load
average before and after.

  python benchmarks/train_step.py                      # every shape
  python benchmarks/train_step.py --shapes=d256 --steps=8
  python benchmarks/train_step.py --dry-run            # tiny shapes, 2 steps
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 256
# kind, d_model, layers, heads, mlp width, seq_len, batch (head_dim 64 everywhere).
SHAPES = {
    "d256": dict(kind="lm", d=256, layers=4, heads=4, mlp=1024, seq=256, batch=16),
    "d512": dict(kind="lm", d=512, layers=8, heads=8, mlp=2048, seq=512, batch=8),
    "griffin256": dict(kind="griffin", d=256, layers=4, heads=4, mlp=768, seq=256, batch=16),
    "griffin512": dict(kind="griffin", d=512, layers=8, heads=8, mlp=1536, seq=512, batch=8),
}
DRY_SHAPES = {
    "d256": dict(kind="lm", d=32, layers=2, heads=2, mlp=64, seq=32, batch=2),
    "griffin256": dict(kind="griffin", d=32, layers=4, heads=2, mlp=64, seq=32, batch=2),
}
IMPLS = {"lm": ("plain_jax", "gemkit", "torch_eager", "torch_compile"),
         "griffin": ("recurrentgemma", "gemkit")}
WINDOW = 128            # Griffin's local attention window
LR = 1e-3


def random_batch(shape: dict) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 [B, T]: the same for every implementation."""
  rows = np.random.default_rng(0).integers(0, VOCAB, (shape["batch"], shape["seq"] + 1))
  rows = rows.astype(np.int32)
  return rows[:, :-1], rows[:, 1:]


# --- plain JAX + NNX --------------------------------------------------------------------

def plain_jax_step(shape: dict, dtype: str):
  """(step(batch) -> loss, param count): the textbook model and its nnx.jit step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  d, h, hd = shape["d"], shape["heads"], shape["d"] // shape["heads"]
  dt = jnp.dtype(dtype)

  class RMSNorm(nnx.Module):
    def __init__(self):
      self.scale = nnx.Param(jnp.ones((d,)))

    def __call__(self, x):
      x32 = x.astype(jnp.float32)
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
      return (y * self.scale[...]).astype(dt)

  def rope(x):
    t = x.shape[1]
    inv = 1.0 / 10_000.0 ** (jnp.arange(0, hd, 2) / hd)
    ang = jnp.arange(t)[:, None] * inv[None]
    sin, cos = jnp.sin(ang)[None, :, None], jnp.cos(ang)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)

  class Block(nnx.Module):
    def __init__(self, rngs):
      lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dt, rngs=rngs)
      self.norm1, self.norm2 = RMSNorm(), RMSNorm()
      self.qkv, self.out = lin(d, 3 * d), lin(d, d)
      self.gate_up, self.down = lin(d, 2 * shape["mlp"]), lin(shape["mlp"], d)

    def __call__(self, x):
      b, t, _ = x.shape
      q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, t, 3 * h, hd), 3, axis=2)
      o = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True)
      x = x + self.out(o.reshape(b, t, d))
      gate, up = jnp.split(self.gate_up(self.norm2(x)), 2, axis=-1)
      return x + self.down(jax.nn.silu(gate) * up)

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, d, dtype=dt, rngs=rngs)
      self.blocks = nnx.List([Block(rngs) for _ in range(shape["layers"])])
      self.norm = RMSNorm()

    def __call__(self, tokens):
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x)
      return self.embed.attend(self.norm(x))

  model = LM(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(LR), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, inputs, targets):
    def loss_fn(model):
      logits = model(inputs).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return lambda inputs, targets: step(model, optimizer, inputs, targets), n


# --- gemkit -----------------------------------------------------------------------------

class _OneBatch:
  """Trainer ``data``: the benchmark batch for every step (no corpus is read)."""

  fingerprint = "benchmark-random-batch"

  def __init__(self, batch: dict):
    self.batch = batch

  def train_dataset(self, batch_size, seed, process_index, process_count):
    del batch_size, seed, process_index, process_count
    return itertools.repeat(self.batch)

  def eval_batches(self, batch_size, max_rows):
    del batch_size, max_rows
    return [self.batch]


def gemkit_config(shape: dict, dtype: str):
  """The experiment config of this shape (lm_tiny, or griffin_tiny as recurrentgemma)."""
  from gemkit import config as config_lib  # pylint: disable=g-import-not-at-top
  common = {"model.vocab_size": VOCAB, "model.num_layers": shape["layers"],
            "model.d_model": shape["d"], "model.num_heads": shape["heads"],
            "model.head_dim": shape["d"] // shape["heads"], "model.mlp_dim": shape["mlp"],
            "model.dtype": dtype, "data.seq_len": shape["seq"],
            "train.batch_size": shape["batch"], "train.lr": LR, "train.steps": 1 << 20,
            "train.log_every": 1 << 20, "train.eval_every": 1 << 20,
            "train.checkpoint_every": 1 << 20, "train.async_checkpoint": False,
            "train.compilation_cache_dir": ""}     # the first step's time is a cold compile
  if shape["kind"] == "lm":
    return config_lib.load("experiments/lm_tiny.py", **common,
                           **{"model.num_kv_heads": shape["heads"]})
  cfg = config_lib.load("experiments/griffin_tiny.py", **common,
                        **{"model.window": WINDOW, "model.num_kv_heads": 1,
                           "model.block_pattern": "RRA"})
  with cfg.unlocked():   # recurrentgemma's architecture (gemkit.hf's RecurrentGemma import)
    cfg.model.update(rope_fraction=0.5, norm_offset=1.0, mlp_bias=True, recurrent_bias=True,
                     out_bias=True)
  config_lib.validate(cfg)
  return cfg


def gemkit_step(shape: dict, dtype: str):
  """(step(inputs, targets) -> loss, param count) through a ``gemkit.train.Trainer``."""
  from gemkit import train  # pylint: disable=g-import-not-at-top

  inputs, targets = random_batch(shape)
  batch = {"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs),
           "loss_mask": np.ones(inputs.shape, np.float32)}
  trainer = train.Trainer(gemkit_config(shape, dtype), tempfile.mkdtemp(prefix="train_step_"),
                          data=_OneBatch(batch))
  # pylint: disable=protected-access
  device_batch = trainer._device_batch(next(trainer.data_iter))

  def step(inputs, targets):
    del inputs, targets   # the same batch, already on the device
    trainer.state, metrics = trainer._train_step(trainer.state, device_batch)
    return trainer.state.step, metrics["loss"]

  return step, trainer.num_params


# --- recurrentgemma ---------------------------------------------------------------------

def recurrentgemma_step(shape: dict, dtype: str):
  """(step, param count): recurrentgemma's Griffin, optax.adamw, jit with donation."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import recurrentgemma.jax as rg  # pylint: disable=g-import-not-at-top

  r, a = rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION
  config = rg.GriffinConfig(
      vocab_size=VOCAB, width=shape["d"], mlp_expanded_width=shape["mlp"],
      num_heads=shape["heads"], block_types=tuple((r, r, a)[i % 3] for i in range(shape["layers"])),
      embeddings_scale_by_sqrt_dim=True, attention_window_size=WINDOW, logits_soft_cap=30.0)
  model = rg.Griffin(config, gradient_checkpointing=False, dtype=jnp.dtype(dtype))
  b, t = shape["batch"], shape["seq"]
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  params = model.init(jax.random.key(0), jnp.zeros((b, t), jnp.int32), pos)
  tx = optax.adamw(LR)
  state = [params, tx.init(params)]

  @jax.jit
  def loss_grad(params, inputs, targets):
    def loss_fn(params):
      logits, _ = model.apply(params, inputs, pos, return_cache=False)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), targets).mean()
    return jax.value_and_grad(loss_fn)(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, inputs, targets):
    loss, grads = loss_grad(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def step(inputs, targets):
    state[0], state[1], loss = update(state[0], state[1], inputs, targets)
    return state[0], loss

  return step, sum(x.size for x in jax.tree.leaves(params))


# --- PyTorch ----------------------------------------------------------------------------

def torch_step(shape: dict, dtype: str, compile_: bool):
  """(step, param count): the plain model in PyTorch, AdamW, eager or torch.compile."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  d, h, hd = shape["d"], shape["heads"], shape["d"] // shape["heads"]
  t = shape["seq"]
  inv = 1.0 / 10_000.0 ** (torch.arange(0, hd, 2, device=device) / hd)
  ang = torch.arange(t, device=device)[:, None] * inv[None]
  sin, cos = ang.sin()[None, None], ang.cos()[None, None]

  def rope(x):            # x [B, H, T, hd]
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
      self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
      self.gate_up = nn.Linear(d, 2 * shape["mlp"], bias=False)
      self.down = nn.Linear(shape["mlp"], d, bias=False)

    def forward(self, x):
      b = x.shape[0]
      q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
      o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
      x = x + self.out(o.transpose(1, 2).reshape(b, t, d))
      gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
      return x + self.down(F.silu(gate) * up)

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, d)
      nn.init.normal_(self.embed.weight, std=d ** -0.5)   # as nnx.Embed's default
      self.blocks = nn.ModuleList([Block() for _ in range(shape["layers"])])
      self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, tokens, targets):
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x)
      logits = self.norm(x) @ self.embed.weight.T
      return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

  model = LM().to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def train(inputs, targets):
    with autocast:
      loss = model(inputs, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  fn = torch.compile(train) if compile_ else train
  as_tensor = lambda x: torch.as_tensor(x, dtype=torch.long, device=device)

  def step(inputs, targets):
    loss = fn(as_tensor(inputs), as_tensor(targets))
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  return step, sum(p.numel() for p in model.parameters())


# --- the child: one implementation, one shape --------------------------------------------

BUILDERS = {
    "plain_jax": plain_jax_step,
    "gemkit": gemkit_step,
    "recurrentgemma": recurrentgemma_step,
    "torch_eager": functools.partial(torch_step, compile_=False),
    "torch_compile": functools.partial(torch_step, compile_=True),
}


def _device_info(impl: str) -> dict:
  """Backend, device and device peak memory of the child (JAX or torch)."""
  if impl.startswith("torch"):
    import torch  # pylint: disable=g-import-not-at-top
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
      info["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return info
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "machine": common.machine(),
          "device_peak_bytes": stats.get("peak_bytes_in_use")}


def run_child(impl: str, shape: dict, dtype: str, steps: int, warmup: int) -> dict:
  """Builds and times one implementation; returns its row."""
  start = time.perf_counter()
  step, num_params = BUILDERS[impl](shape, dtype)
  build_s = time.perf_counter() - start
  inputs, targets = random_batch(shape)
  wait = _waiter(impl)
  start = time.perf_counter()
  wait(step(inputs, targets))
  first_step_s = time.perf_counter() - start
  for _ in range(warmup):
    wait(step(inputs, targets))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    out = step(inputs, targets)
    wait(out)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  loss = float(out[1] if isinstance(out, tuple) else out)
  tokens = shape["batch"] * shape["seq"]
  return {"impl": impl, "params": int(num_params), "build_s": build_s,
          "first_step_s": first_step_s, "step_ms": median * 1e3,
          "step_ms_min": min(times) * 1e3, "tokens_per_sec": tokens / median,
          "final_loss": loss, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
          * 1024, **_device_info(impl)}


def _waiter(impl: str):
  if impl.startswith("torch"):
    return lambda out: None        # the step synchronizes (CPU: it is synchronous)
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready


# --- the parent: one child per (shape, implementation) -----------------------------------

def _default_dtype() -> str:
  """bfloat16 when a GPU/TPU is visible (checked without initializing jax here)."""
  probe = "import jax; print(jax.default_backend())"
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=ROOT, check=False)
  return "float32" if out.stdout.strip() in ("cpu", "") else "bfloat16"


def _available(impl: str) -> str | None:
  """None if ``impl`` can run here, else why not."""
  module = {"torch_eager": "torch", "torch_compile": "torch",
            "recurrentgemma": "recurrentgemma"}.get(impl)
  if module is None:
    return None
  import importlib.util  # pylint: disable=g-import-not-at-top
  return None if importlib.util.find_spec(module) else f"{module} is not installed"


def spawn(impl: str, name: str, shape: dict, args) -> dict:
  """Runs one child process; its row (or the error it ended with)."""
  why = _available(impl)
  if why:
    return {"impl": impl, "shape": name, "skipped": why}
  cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--child_shape",
         json.dumps(shape), "--dtype", args.dtype, "--steps", str(args.steps),
         "--warmup", str(args.warmup)]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
  if out.returncode != 0:
    return {"impl": impl, "shape": name, "error": out.stderr.strip().splitlines()[-1:]}
  return {"shape": name, **json.loads(out.stdout.strip().splitlines()[-1])}


def best_runs(runs: list[dict]) -> list[dict]:
  """Per (shape, implementation): the run with the shortest median step (a shared
  machine's load only slows a run down), else the first (skipped or failed)."""
  best = {}
  for r in runs:
    key = (r["shape"], r["impl"])
    if key not in best or r.get("step_ms", float("inf")) < best[key].get("step_ms", float("inf")):
      best[key] = r
  return list(best.values())


def print_table(rows: list[dict], shapes: dict) -> None:
  """Rows per shape, speed relative to the shape's baseline (the first implementation)."""
  print(f"{'shape':11} {'impl':15} {'params':>8} {'tok/s':>9} {'vs base':>8} "
        f"{'step ms':>9} {'1st step s':>10} {'peak RSS':>9} {'dev peak':>9}  loss")
  for name, shape in shapes.items():
    mine = [r for r in rows if r["shape"] == name]
    base = next((r for r in mine if r["impl"] == IMPLS[shape["kind"]][0] and "step_ms" in r),
                None)
    for r in mine:
      if "step_ms" not in r:
        print(f"{name:11} {r['impl']:15} {r.get('skipped') or r.get('error')}")
        continue
      ratio = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "-"
      dev = r.get("device_peak_bytes")
      dev = f"{dev / 2**30:.2f}G" if dev else "-"
      print(f"{name:11} {r['impl']:15} {r['params'] / 1e6:7.2f}M {r['tokens_per_sec']:9,.0f} "
            f"{ratio:>8} {r['step_ms']:9.1f} {r['first_step_s']:10.1f} "
            f"{r['peak_rss_bytes'] / 2**30:8.2f}G {dev:>9}  {r['final_loss']:.3f}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=None,
                      help=f"comma list of {sorted(SHAPES)} (default: all)")
  parser.add_argument("--steps", type=int, default=8, help="timed steps (median)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  parser.add_argument("--repeats", type=int, default=1,
                      help="runs of every child, interleaved; the table keeps each one's best")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
  parser.add_argument("--impls", default=None, help="comma list of implementations")
  parser.add_argument("--out", default=None)
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny shapes, 2 steps, the same code paths")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child_shape", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    row = run_child(args.child, json.loads(args.child_shape), args.dtype, args.steps,
                    args.warmup)
    print(json.dumps(row))
    return
  table = DRY_SHAPES if args.dry_run else SHAPES
  if args.dry_run:
    args.steps, args.warmup, args.repeats = 2, 0, 1
  names = args.shapes.split(",") if args.shapes else list(table)
  unknown = set(names) - set(table)
  if unknown:
    parser.error(f"unknown shapes {sorted(unknown)} (known: {sorted(table)})")
  args.dtype = args.dtype or _default_dtype()
  shapes = {n: table[n] for n in names}
  load_before = os.getloadavg()
  out = args.out or (os.path.join(tempfile.gettempdir(), "train_step_dry_run.json")
                     if args.dry_run else None)
  runs, path = [], None
  for repeat in range(args.repeats):
    for name, shape in shapes.items():
      for impl in IMPLS[shape["kind"]]:
        if args.impls and impl not in args.impls.split(","):
          continue
        r = {"repeat": repeat, "loadavg": os.getloadavg()[0], **spawn(impl, name, shape, args)}
        runs.append(r)
        print(f"  {name} {impl}: " + (f"{r['tokens_per_sec']:,.0f} tok/s" if "step_ms" in r
                                       else str(r.get("skipped") or r.get("error"))),
              flush=True)
        path = write_result(args, shapes, runs, load_before, out)   # a killed run keeps these
  machine = next((r["machine"] for r in runs if "machine" in r), platform.machine())
  print(f"# {machine}, {args.dtype}, median of {args.steps} steps after "
        f"1 + {args.warmup}, best of {args.repeats} runs; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
  print_table(best_runs(runs), shapes)
  print(f"wrote {path}")


def write_result(args, shapes: dict, runs: list[dict], load_before, out: str | None) -> str:
  """Writes the JSON of the runs so far to ``out`` (default: by the children's machine)."""
  machine = next((r["machine"] for r in runs if "machine" in r), platform.machine())
  out = out or os.path.join(ROOT, "benchmarks", "results", f"train_step_{machine}.json")
  result = {"command": " ".join(sys.argv), "machine": machine, "dtype": args.dtype,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "dry_run": args.dry_run, "loadavg_before": load_before,
            "loadavg_now": os.getloadavg(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "shapes": shapes,
            "rows": best_runs(runs), "runs": runs}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  return out


if __name__ == "__main__":
  main()
