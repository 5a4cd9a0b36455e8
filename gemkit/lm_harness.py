"""gemkit as an lm-evaluation-harness model, registered as ``gemkit``.

    python -m launch.lm_eval --model gemkit --model_args pretrained=runs/lm_tiny \\
        --tasks hellaswag --batch_size 16
    python -m launch.lm_eval --model gemkit \\
        --model_args pretrained=/models/Llama-3.2-1B,dtype=bfloat16,quantize=int4-g128 ...

    import gemkit.lm_harness, lm_eval                  # the import registers "gemkit"
    lm_eval.simple_evaluate(model="gemkit", model_args="pretrained=runs/lm_tiny", tasks=[...])

lm-eval is an optional dependency (``pip install -e .[eval]``); only this
module imports it. lm-eval 0.4.13 discovers no out-of-tree models: importing
this module registers the model (``launch.lm_eval`` and the ``gemkit-lm-eval``
script import it, then run lm-eval's own command line). Newer lm-eval releases
read the ``lm_eval.models`` entry point that pyproject.toml declares.

``model_args``:

* ``pretrained``: a run directory, its ``checkpoints/`` or ``checkpoints/<step>``
  (``step=`` picks another), or a Hugging Face model directory; loaded with
  ``gemkit.hf.load`` / ``gemkit.runs.load`` and the run's tokenizer
  (``gemkit.runs.load_tokenizer``: the directory's tokenizer.json).
* ``dtype``: float32 / bfloat16 / float16 for a Hugging Face directory (default:
  the checkpoint's); a run computes in the dtype it records.
* ``adapter``: a PEFT adapter directory (it has adapter_config.json:
  ``gemkit.hf.load_adapter``) or a gemkit adapter checkpoint
  (``gemkit.surgery.lora.load_adapter``; a QLoRA adapter quantizes its base itself).
* ``quantize``: a ``gemkit.surgery.quantize`` spec (``int8``, ``int4-g128``, ``nf4``, ...):
  every Dense layer but an untied head (``quantize.default_rules``), after the adapter.
* ``batch_size`` (lm-eval's ``--batch_size``; ``auto`` means 8): rows per forward
  pass and process, rounded up to a multiple of the devices that split the batch.
* ``max_length`` (default: config.json's ``max_position_embeddings``, a run's
  ``data.seq_len``, else 2048), ``max_gen_toks`` (default 256): as lm-eval's ``hf``.
* ``add_bos_token``, ``prefix_token_id``: as lm-eval's ``hf`` (below).
* ``tensor``: tensor-parallel size inside each process (default 1).

Requests are encoded exactly as lm-eval's ``hf`` backend (``HFLM``) does, so the
numbers are comparable: loglikelihood through ``TemplateLM._encode_pair``
(trailing spaces of the context move to the continuation; continuation ids =
enc(context + continuation) minus the first len(enc(context)); an empty
context is the prefix token); inputs ``(context + continuation)[-(max_length +
1):][:-1]``, cut from the left; rolling loglikelihood over
``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window`` windows
of ``max_length`` after the prefix token; generation from the context cut to
its last ``max_length - max_gen_toks`` ids. ``enc`` puts BOS first as
``transformers.AutoTokenizer(dir)`` does by default: when tokenizer_config.json
sets ``add_bos_token``, by it, else when tokenizer.json's post-processor inserts
BOS (Llama, Gemma: yes; GPT-2, Qwen, the tokenizer built in the tests: no);
the byte tokenizer always. ``add_bos_token=true|false`` overrides, and a
string that starts with the prefix token's text gets no second one. The prefix
token is BOS (EOS for tokenizers without one), or ``prefix_token_id``. Not
emulated: an EOS that a tokenizer appends to every encoding (``add_eos_token``,
a post-processor ``$A </s>``), which transformers would add.

Scoring runs the model's forward pass (``model(tokens, segment_ids)``) on
batches of a fixed number of rows (dummy rows fill the last one), right-padded
to the next of a few lengths (powers of two from 16, then ``max_length``), so
only a handful of shapes compile; a log line says how many. ``generate_until``
decodes greedily with the KV cache or recurrent state
(``gemkit.sample.generate_ids`` on prompt batches padded to the same lengths),
stops each row at the tokenizer's stop ids and cuts its text at the first
``until`` string (and the EOS token's text), as ``HFLM`` does. ``do_sample=True``
or ``temperature > 0`` is refused: gemkit scores and decodes greedily only.
An empty generation context starts from the prefix token.

Several processes (``jax.distributed``; ``launch.lm_eval`` starts it from the
environment, as every gemkit launcher): ``rank`` is ``jax.process_index()``,
``world_size`` ``jax.process_count()``. lm-eval gives each rank its slice of the
documents and gathers results on rank 0 (``all_gather``, ``gather_object``,
``barrier`` here, over ``jax.experimental.multihost_utils``). The mesh puts
the processes on ``data`` (each holds a copy of the model, sharded over its own
devices by ``fsdp``, or ``tensor``), and every batch is one global batch made
of every process's rows, so all processes run each forward pass: before each
kind of batch they agree on how many batches of each shape to run, and a rank
with fewer runs dummy batches.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import pathlib
import pickle
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from flax import nnx
from tqdm import tqdm

# The built-in models first: lm-eval fills its registry from lm_eval.models only when
# the registry is empty, so registering "gemkit" alone would hide "hf" and the others.
import lm_eval.models  # noqa: F401  pylint: disable=unused-import
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

from gemkit import evaluate
from gemkit import hf
from gemkit import runs
from gemkit import sample as sample_lib
from gemkit import sharding
from gemkit import tokenizer as tokenizer_lib
from gemkit.config import ConfigError
from gemkit.surgery import lora
from gemkit.surgery import quantize as quantize_lib

log = logging.getLogger("lm_eval.models.gemkit")   # under lm-eval's logger: its handler, level

NAME = "gemkit"
MIN_BUCKET = 16              # the shortest padded length
DEFAULT_BATCH = 8            # rows per forward pass and process for batch_size=auto
DEFAULT_MAX_LENGTH = 2048    # as HFLM, when nothing records a context length
DEFAULT_MAX_GEN_TOKS = 256   # as HFLM


def buckets(max_length: int) -> list[int]:
  """The padded lengths: powers of two from MIN_BUCKET below max_length, then max_length."""
  out, b = [], MIN_BUCKET
  while b < max_length:
    out.append(b)
    b *= 2
  return out + [max_length]


def bucket_of(length: int, lengths: Sequence[int]) -> int:
  """The shortest of ``lengths`` (ascending) that holds ``length`` (else the longest)."""
  return next((b for b in lengths if b >= length), lengths[-1])


@functools.lru_cache(maxsize=16)
def _scorer(graphdef, rows_sharding):
  """The jitted ``evaluate.score_rows`` of one model structure and mesh (shared by instances:
  variants of one architecture reuse its compilations)."""
  return jax.jit(functools.partial(evaluate.score_rows, graphdef),
                 out_shardings=(rows_sharding, rows_sharding))




# --- tokenizer facts HFLM reads from transformers ----------------------------------------


def _hf_parts(tok: tokenizer_lib.Tokenizer) -> tuple[Any, dict]:
  """(the ``tokenizers.Tokenizer``, tokenizer_config.json) of an HFTokenizer, else (None, {})."""
  if not isinstance(tok, tokenizer_lib.HFTokenizer):
    return None, {}
  config = tok._files.get("tokenizer_config.json")  # pylint: disable=protected-access
  return tok._tok, json.loads(config) if config else {}  # pylint: disable=protected-access


def named_bos_id(tok: tokenizer_lib.Tokenizer) -> int | None:
  """transformers' ``bos_token_id``: the tokenizer's BOS, also where it is never put
  first (``add_bos_token: false`` makes gemkit's ``bos_id`` None)."""
  if tok.bos_id is not None:
    return tok.bos_id
  backend, config = _hf_parts(tok)
  value = config.get("bos_token")
  value = value.get("content") if isinstance(value, dict) else value
  return backend.token_to_id(value) if backend is not None and value else None


def default_adds_bos(tok: tokenizer_lib.Tokenizer) -> bool:
  """Whether ``transformers.AutoTokenizer(dir).encode(text)`` puts BOS first: by
  tokenizer_config.json's ``add_bos_token`` where it sets one, else by tokenizer.json's
  post-processor; always for the byte tokenizer (its exported tokenizer.json does)."""
  if isinstance(tok, tokenizer_lib.ByteTokenizer):
    return True
  if tok.bos_id is None:
    return False
  backend, config = _hf_parts(tok)
  if backend is None:
    return True
  if "add_bos_token" in config:
    return bool(config["add_bos_token"])
  plain = backend.encode("a", add_special_tokens=False).ids
  full = backend.encode("a", add_special_tokens=True).ids
  return len(full) > len(plain) and full[0] == tok.bos_id


def token_text(tok: tokenizer_lib.Tokenizer, token_id: int) -> str:
  """The text of one id with special tokens spelled out (transformers' ``decode(id)``)."""
  backend, _ = _hf_parts(tok)
  if backend is not None:
    return backend.decode([int(token_id)], skip_special_tokens=False)
  if isinstance(tok, tokenizer_lib.ByteTokenizer) and token_id >= tokenizer_lib.PAD:
    names = dict(zip((tokenizer_lib.PAD, tokenizer_lib.BOS, tokenizer_lib.EOS),
                     tokenizer_lib.ByteTokenizer.SPECIAL_TOKENS))
    return names[int(token_id)]
  return tok.decode([token_id])


# --- the model ------------------------------------------------------------------------------


@register_model(NAME)
class GemkitLM(TemplateLM):
  """A gemkit model (run or Hugging Face directory) for lm-eval (module docstring)."""

  def __init__(self, pretrained: str, *, step: int | None = None, dtype: str | None = None,
               adapter: str | None = None, quantize: str | None = None,
               batch_size: int | str | None = None, max_length: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, tensor: int = 1,
               max_batch_size: int | None = None, device: str | None = None, **unknown):
    super().__init__()
    if unknown:
      raise ConfigError("model_args", f"gemkit: unknown model_args {sorted(unknown)}; known: "
                        "pretrained, step, dtype, adapter, quantize, batch_size, max_length, "
                        "max_gen_toks, add_bos_token, prefix_token_id, tensor")
    del max_batch_size    # lm-eval passes it for batch_size=auto; batches here are fixed
    if device:
      log.info("gemkit: device=%s ignored: the model is on JAX's %s devices (JAX_PLATFORMS "
               "chooses the backend)", device, jax.default_backend())
    start = time.perf_counter()
    self.pretrained, self.step, self.adapter, self.quantize = (
        str(pretrained), step, adapter, quantize)
    self.mesh = self._make_mesh(int(tensor))
    model, config, self.tokenizer = self._load(pretrained, step, dtype)
    model = self._add_adapter(model, adapter)
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(
        nnx.state(model, nnx.Param))))          # before quantization packs the weights
    model = self._quantize(model, quantize)
    graphdef, state = nnx.split(model)
    state = sharding.place(state, self.mesh)
    self.model = nnx.merge(graphdef, state)
    self._graphdef, self._state = graphdef, state
    self.dtype = str(model_dtype(config))
    # lm-eval reads rank / world_size through LM's properties over these two, and
    # batch_size, max_length and max_gen_toks (HFLM's names) as attributes.
    self._rank, self._world_size = jax.process_index(), jax.process_count()

    per_process = self.mesh.shape["data"] * self.mesh.shape["fsdp"] // self._world_size
    rows = DEFAULT_BATCH if batch_size in (None, "") or str(batch_size).startswith(
        "auto") else int(batch_size)
    if rows < 1:
      raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    self.batch_size = -(-rows // per_process) * per_process
    self.max_length = int(max_length) if max_length else default_max_length(pretrained,
                                                                              config)
    self.max_gen_toks = int(max_gen_toks)
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self._adds_bos = default_adds_bos(self.tokenizer)
    self.buckets = buckets(self.max_length)
    rows_sharding = sharding.logical_sharding(self.mesh, ("batch", None))
    self._score = _scorer(graphdef, rows_sharding)
    self.compiled: set[tuple] = set()   # (kind, shape) of every compiled batch shape
    log.info("gemkit: %s%s%s loaded in %.1fs; tokenizer %s; %d rows per batch and process, "
             "max_length %d, padded lengths %s, mesh %s, rank %d of %d", pretrained,
             f" + adapter {adapter}" if adapter else "",
             f" quantized {quantize}" if quantize else "", time.perf_counter() - start,
             self.tokenizer.describe(), self.batch_size, self.max_length, self.buckets,
             dict(self.mesh.shape), self._rank, self._world_size)

  # -- loading ------------------------------------------------------------------------------

  @staticmethod
  def _make_mesh(tensor: int):
    """data over the processes; inside each, fsdp over its devices (or tensor)."""
    cfg = {"data": 1, "fsdp": -1, "sequence": 1, "tensor": tensor}
    if jax.process_count() > 1:
      cfg["dcn_data"] = jax.process_count()
    return sharding.make_mesh(ml_collections.ConfigDict(cfg))

  def _load(self, pretrained, step, dtype):
    if hf.is_model_dir(pretrained):
      model, config, tok = hf.load(pretrained, dtype=dtype, mesh=self.mesh)
      return model, config, tok
    model, config = runs.load(pretrained, step)
    recorded = model_dtype(config)
    if dtype and recorded and str(dtype) != str(recorded):
      raise ConfigError("dtype", f"gemkit: dtype={dtype} applies to Hugging Face directories; "
                        f"the run {pretrained} computes in {recorded} (config.model.dtype)")
    return model, config, runs.load_tokenizer(pretrained)

  @staticmethod
  def _add_adapter(model, adapter):
    if adapter:
      directory = pathlib.Path(adapter)
      if (directory / "adapter_config.json").is_file():
        model = hf.load_adapter(model, directory)
      else:
        model = lora.load_adapter(model, directory)
    return model

  @staticmethod
  def _quantize(model, quantize):
    if quantize:
      try:
        model, _ = quantize_lib.quantize_model(model, quantize_lib.default_rules(quantize))
      except ValueError as e:
        raise ConfigError("quantize", f"gemkit: quantize={quantize}: {e}") from None
    return model

  # -- what lm-eval reads -------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return int(self.custom_prefix_token_id)
    bos = named_bos_id(self.tokenizer)
    return self.tokenizer.eos_id if bos is None else bos

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name.replace("/", "__")

  def get_model_info(self) -> dict:
    return {"model_num_parameters": self.num_params, "model_dtype": self.dtype,
            "gemkit_pretrained": self.pretrained, "gemkit_step": self.step,
            "gemkit_adapter": self.adapter, "gemkit_quantize": self.quantize}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """The ids of ``string`` as ``HFLM.tok_encode`` gives them (module docstring)."""
    del kwargs
    if add_special_tokens is None:
      special = True if self.add_bos_token is None else bool(self.add_bos_token)
      if string.startswith(token_text(self.tokenizer, self.prefix_token_id)):
        special = False
    else:
      special = bool(add_special_tokens)
    adds = self._adds_bos if self.add_bos_token is None else bool(self.add_bos_token)
    bos = named_bos_id(self.tokenizer)
    ids = self.tokenizer.encode(string).tolist()
    if special and adds and bos is not None:
      ids = [bos] + ids
    return ids[-left_truncate_len:] if left_truncate_len else ids

  # -- several processes --------------------------------------------------------------------

  def all_gather(self, tensor):
    """Every rank's value of a (torch) tensor, stacked: lm-eval counts requests with it."""
    if self._world_size == 1:
      return tensor
    import torch  # pylint: disable=g-import-not-at-top
    values = allgather_object(np.asarray(tensor.detach().cpu()))
    return torch.as_tensor(np.stack(values))

  def gather_object(self, obj, dst: int = 0):
    if self._world_size == 1:
      return [obj]
    values = allgather_object(obj)
    return values if self._rank == dst else None

  def barrier(self) -> None:
    if self._world_size > 1:
      multihost_utils.sync_global_devices("gemkit lm_eval barrier")

  def _agree(self, counts: dict) -> dict:
    """The most batches any process has of each shape key (every process runs that many)."""
    if self._world_size == 1:
      return dict(counts)
    merged: dict = collections.Counter()
    for c in allgather_object(dict(counts)):
      for k, n in c.items():
        merged[k] = max(merged[k], n)
    return dict(merged)

  def _log_shapes(self, kind: str, n: int, batches: int, elapsed: float) -> None:
    shapes = sorted(s for k, s in self.compiled if k == kind)
    log.info("gemkit: %s: %d rows in %d batches in %.1fs; %d %s batch shapes so far, "
             "each compiled once (%d in all): %s", kind, n, batches, elapsed, len(shapes),
             kind, len(self.compiled), shapes)

  # -- scoring ------------------------------------------------------------------------------

  def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                 progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(log p(target) [T_i] float32, target is argmax [T_i]) per row of (inputs, targets).

    Rows (at most ``max_length`` ids) go longest first into batches of ``batch_rows``
    rows right-padded to their bucket (``buckets``); padding is segment 0.
    """
    pad = self.tokenizer.pad_id
    by_bucket: dict[int, list[int]] = collections.defaultdict(list)
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
      if not 0 < len(rows[i][0]) <= self.max_length:
        raise ValueError(f"a row of {len(rows[i][0])} ids: must be 1 .. {self.max_length}")
      by_bucket[bucket_of(len(rows[i][0]), self.buckets)].append(i)
    batches = {b: [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
               for b, idx in by_bucket.items()}
    counts = self._agree({b: len(v) for b, v in batches.items()})
    out: list[Any] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="gemkit: scoring", disable=not progress or self._rank != 0)
    start, ran = time.perf_counter(), 0
    with sharding.activate(self.mesh):
      for length in sorted(counts, reverse=True):
        mine = batches.get(length, [])
        for k in range(counts[length]):
          idx = mine[k] if k < len(mine) else []
          inputs = np.full((self.batch_size, length), pad, np.int32)
          targets = np.full((self.batch_size, length), pad, np.int32)
          seg = np.zeros((self.batch_size, length), np.int32)
          for j, i in enumerate(idx):
            n = len(rows[i][0])
            inputs[j, :n], targets[j, :n], seg[j, :n] = rows[i][0], rows[i][1], 1
          lp, greedy = self._score(self._state, sharding.global_batch(self.mesh, inputs),
                                   sharding.global_batch(self.mesh, targets),
                                   sharding.global_batch(self.mesh, seg))
          self.compiled.add(("score", (self.batch_size * self._world_size, length)))
          lp, greedy = sharding.local_rows(self.mesh, lp), sharding.local_rows(self.mesh, greedy)
          for j, i in enumerate(idx):
            n = len(rows[i][0])
            out[i] = (lp[j, :n], greedy[j, :n])
          ran += 1
          bar.update(len(idx))
    bar.close()
    self._log_shapes("score", len(rows), ran, time.perf_counter() - start)
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(sum log p(continuation), all continuation ids greedy) of (key, context ids,
    continuation ids) requests; inputs cut from the left to ``max_length`` as HFLM."""
    del kwargs
    rows, spans = [], []
    for _, context, continuation in requests:
      if not context or not continuation:
        raise ValueError("gemkit: context and continuation must each have >= 1 id")
      if len(continuation) > self.max_length:
        raise ValueError(f"gemkit: a continuation of {len(continuation)} ids exceeds "
                         f"max_length={self.max_length}")
      seq = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((seq[:-1], seq[1:]))
      spans.append(len(continuation))
    scored = self.score_rows(rows, progress=not disable_tqdm)
    out = []
    for (key, _, _), (lp, greedy), n in zip(requests, scored, spans):
      answer = (float(lp[-n:].astype(np.float64).sum()), bool(greedy[-n:].all()))
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Sum of log p over every id of each text: disjoint windows of ``max_length``
    after the prefix token, as HFLM (``get_rolling_token_windows``, ``context_len=1``)."""
    windows, owner = [], []
    for r, req in enumerate(requests):
      (text,) = req.args
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(r)
    totals = [0.0] * len(requests)
    for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows,
                                                              disable_tqdm=disable_tqdm)):
      totals[r] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -- generation ---------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations (KV cache / recurrent state), cut at the stop ids and at the
    first ``until`` string or the EOS token's text, as HFLM."""
    eos_text = token_text(self.tokenizer, self.eot_token_id)
    prompts, untils, groups = [], [], collections.defaultdict(list)
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
      if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        raise ValueError(f"gemkit decodes greedily only; a request asks for sampling "
                         f"(do_sample={kwargs.get('do_sample')}, temperature="
                         f"{kwargs.get('temperature')}): use the hf backend for sampled tasks")
      untils.append(handle_stop_sequences(kwargs.pop("until", None), eos=eos_text))
      max_new = int(kwargs.pop("max_gen_toks"))
      if self.max_length - max_new <= 0:
        raise ValueError(f"gemkit: max_gen_toks={max_new} must be < max_length="
                         f"{self.max_length}")
      ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
      prompts.append(ids or [self.prefix_token_id])
      groups[(max_new, bucket_of(len(prompts[-1]), self.buckets))].append(i)
    for idx in groups.values():
      idx.sort(key=lambda i: -len(prompts[i]))
    batches = {key: [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
               for key, idx in groups.items()}
    counts = self._agree({key: len(v) for key, v in batches.items()})
    out = [""] * len(requests)
    bar = tqdm(total=len(requests), desc="gemkit: generating",
               disable=disable_tqdm or self._rank != 0)
    start, ran = time.perf_counter(), 0
    tok = self.tokenizer
    for key in sorted(counts):
      max_new, length = key
      mine = batches.get(key, [])
      for k in range(counts[key]):
        idx = mine[k] if k < len(mine) else []
        batch = [prompts[i] for i in idx] + [[self.prefix_token_id]] * (self.batch_size
                                                                        - len(idx))
        ids = sample_lib.generate_ids(self.model, batch, max_new_tokens=max_new,
                                      eos_ids=tok.stop_ids, pad_id=tok.pad_id,
                                      prompt_len=length, mesh=self.mesh)
        self.compiled.add(("generate", (self.batch_size * self._world_size, length, max_new)))
        for row, i in zip(ids, idx):
          text = postprocess_generated_text(sample_lib.text_until_stop(row, tok), untils[i],
                                            None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        ran += 1
        bar.update(len(idx))
    bar.close()
    self._log_shapes("generate", len(requests), ran, time.perf_counter() - start)
    return out


# --- helpers --------------------------------------------------------------------------------


def model_dtype(config) -> str | None:
  try:
    return str(config.model.dtype)
  except (AttributeError, KeyError):
    return None


def default_max_length(pretrained, config) -> int:
  """config.json's max_position_embeddings (as HFLM), a run's data.seq_len, else 2048."""
  if hf.is_model_dir(pretrained):
    hf_config = hf.checkpoint.read_config(pretrained)
    hf_config = hf_config.get("text_config") or hf_config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
      if hf_config.get(key):
        return int(hf_config[key])
    return DEFAULT_MAX_LENGTH
  try:
    return int(config.data.seq_len)
  except (AttributeError, KeyError, TypeError):
    return DEFAULT_MAX_LENGTH


def allgather_object(obj) -> list:
  """Every process's ``obj`` (picklable), in process order (every process calls it).

  lm-eval's ``gather_object`` contract is arbitrary Python objects, so they
  travel pickled between this job's own processes, as torch.distributed's
  do; nothing read from disk is ever unpickled."""
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(data.size, np.int64)))
  buffer = np.zeros(int(sizes.max()), np.uint8)
  buffer[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [pickle.loads(gathered[p, :int(n)].tobytes()) for p, n in enumerate(sizes.reshape(-1))]
