"""Optimizers and learning-rate schedules (optax).

Schedules, for peak rate eta, T total steps, W warmup steps:

  cosine:    linear warmup to eta, then cosine decay to min_ratio * eta at T.
  constant:  linear warmup to eta, then eta.
  wsd:       warmup-stable-decay (MiniCPM, Hu et al. 2024): linear warmup,
             eta until step S = T - D with D = decay_fraction * T, then a
             decay over D steps to r = min_ratio, with progress p in [0, 1]:
               linear  eta * (1 - (1 - r) p)
               cosine  eta * (r + (1 - r)(1 + cos(pi p)) / 2)
               exp     eta * r^p                   (MiniCPM's exponential decay)
               sqrt    eta * (1 - (1 - r) sqrt(p)) ("1-sqrt", Hägele et al. 2024)

The optimizer is AdamW with decoupled weight decay on matrices only (ndim >= 2:
no decay on norm scales and biases), after global-norm gradient clipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _wsd_decay(kind: str, peak: float, steps: int, min_ratio: float) -> optax.Schedule:
  r = min_ratio

  def schedule(count):
    p = jnp.clip(count / max(steps, 1), 0.0, 1.0)
    if kind == "linear":
      f = 1 - (1 - r) * p
    elif kind == "cosine":
      f = r + (1 - r) * 0.5 * (1 + jnp.cos(jnp.pi * p))
    elif kind == "exp":
      f = jnp.power(max(r, 1e-8), p)
    elif kind == "sqrt":
      f = 1 - (1 - r) * jnp.sqrt(p)
    else:
      raise ValueError(f"unknown WSD decay {kind!r}")
    return peak * f

  return schedule


def wsd_schedule(peak: float, total_steps: int, warmup_steps: int,
                 decay_fraction: float, decay: str = "sqrt",
                 min_ratio: float = 0.0) -> optax.Schedule:
  """Warmup-stable-decay schedule (see module docstring)."""
  decay_steps = int(round(decay_fraction * total_steps))
  stable_end = max(total_steps - decay_steps, warmup_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
       optax.constant_schedule(peak),
       _wsd_decay(decay, peak, decay_steps, min_ratio)],
      boundaries=[warmup_steps, stable_end])


def make_schedule(train_cfg) -> optax.Schedule:
  t = train_cfg
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
        end_value=t.lr * t.min_lr_ratio)
  if t.schedule == "wsd":
    return wsd_schedule(t.lr, t.steps, t.warmup_steps, t.decay_fraction,
                        t.wsd_decay, t.min_lr_ratio)
  if t.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1)),
                                 optax.constant_schedule(t.lr)], [t.warmup_steps])
  raise ValueError(f"unknown schedule {t.schedule!r}")


def decay_mask(params):
  """True for parameters that get weight decay (matrices, ndim >= 2)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm -> AdamW(schedule); returns (tx, schedule)."""
  t = train_cfg
  schedule = make_schedule(t)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=decay_mask))
  return tx, schedule
