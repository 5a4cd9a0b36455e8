"""Sampling with the decode cache (``models.lm``): greedy, temperature, top-k and top-p (nucleus).

Prompts are right-padded and prefilled in one ``decode`` call with per-sequence
lengths; then one token per step inside a jitted ``lax.scan``.

Given logits z and temperature tau > 0, tokens are drawn from
softmax(z / tau) restricted to the k largest logits (top_k > 0) and to the
smallest set whose probability mass reaches p (top_p < 1, Holtzman et al.
2020). tau = 0 is greedy (argmax).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemkit import sharding
from gemkit.tokenizer import EOS, PAD, Tokenizer, resolve


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Draws one id per row of logits [B, V]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the top one always).
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_ids", "pad_id"))
def _generate(graphdef, state, prompt, lengths, key, *, max_new_tokens, temperature,
              top_k, top_p, eos_ids, pad_id):
  model = nnx.merge(graphdef, state)
  B, P = prompt.shape
  cache = model.init_cache(B, P + max_new_tokens)
  logits, cache = model.decode(prompt, cache, num_valid=lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

  def step(carry, step_key):
    cache, logits, done = carry
    tok = sample_logits(logits, step_key, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    done = done | jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32))
    logits, cache = model.decode(tok[:, None], cache)
    return (cache, logits[:, 0], done), tok

  _, tokens = jax.lax.scan(step, (cache, last, jnp.zeros((B,), bool)),
                           jax.random.split(key, max_new_tokens))
  return tokens.T


def generate_ids(model: nnx.Module, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, eos_ids: Sequence[int] = (EOS,),
                 pad_id: int = PAD, prompt_len: int | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Continues each prompt (token ids, ragged) by max_new_tokens ids [B, N].

  After any of ``eos_ids`` a row emits ``pad_id`` (defaults: the byte tokenizer's).
  ``prompt_len``: the prompts are right-padded to this many ids (default: the
  longest), so batches of one ``prompt_len`` share one compilation.
  ``mesh``: the model's state is on it (``gemkit.sharding.place``) and the
  prompts are this process's rows of a batch split over the processes
  (``gemkit.sharding.global_batch``): every process calls with the same number of
  prompts, ``prompt_len`` and ``max_new_tokens``, and gets its own rows back.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be non-empty token sequences")
  longest = max(len(p) for p in prompts)
  P = longest if prompt_len is None else prompt_len
  if P < longest:
    raise ValueError(f"prompt_len={prompt_len} is shorter than a prompt of {longest} ids")
  prompt = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    prompt[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  graphdef, state = nnx.split(model)
  kw = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
            top_p=float(top_p), eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id))
  if mesh is None:
    out = _generate(graphdef, state, jnp.asarray(prompt), jnp.asarray(lengths),
                    jax.random.key(seed), **kw)
    return np.asarray(out)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  key = np.asarray(jax.random.key_data(jax.random.key(seed)))
  with sharding.activate(mesh):
    out = _generate(graphdef, state, sharding.global_batch(mesh, prompt),
                    sharding.global_batch(mesh, lengths),
                    jax.make_array_from_callback(key.shape, replicated, lambda i: key[i]), **kw)
    return sharding.local_rows(mesh, out)


def generate(model: nnx.Module, prompts: Sequence[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, tokenizer: Tokenizer | None = None) -> list[str]:
  """Text continuations of text prompts in ``tokenizer``'s ids (default bytes): each
  prompt BOS-prefixed (if the tokenizer has a BOS), stopped at any of its stop ids."""
  tok = resolve(tokenizer)
  ids = generate_ids(model, [tok.encode(p, bos=True) for p in prompts],
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, eos_ids=tok.stop_ids, pad_id=tok.pad_id)
  return [text_until_stop(row, tok) for row in ids]


def text_until_stop(ids: np.ndarray, tokenizer: Tokenizer) -> str:
  """The text of generated ``ids`` before the first of the tokenizer's stop ids."""
  stop = np.flatnonzero(np.isin(ids, tokenizer.stop_ids))
  return tokenizer.decode(ids[:stop[0]] if stop.size else ids)
