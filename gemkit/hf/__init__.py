"""The bridge to the Hugging Face formats, in and out: local directories only,
safetensors only (never unpickle).

    model, config, tokenizer = gemkit.hf.load(path, dtype=None, mesh=None)
    gemkit.hf.save(model, config, out_dir, tokenizer=None)   # transformers reads it
    gemkit.hf.model_config(path)          # the config.model block of a directory

Supported architectures: ``gemkit.hf.architectures.ARCHITECTURES``.
"""

from gemkit.hf.architectures import ARCHITECTURES
from gemkit.hf.checkpoint import HFError, is_model_dir
from gemkit.hf.convert import (load, load_weights, model_config, resolve_model_config,
                                save)
from gemkit.hf.peft import load_adapter, save_adapter

__all__ = ["ARCHITECTURES", "HFError", "is_model_dir", "load", "load_weights",
           "model_config", "resolve_model_config", "save", "save_adapter", "load_adapter"]
