"""ops.config: the interpret default and the GEMKIT_INTERPRET switch."""

import pytest

from ops import config


@pytest.mark.parametrize("raw,want", [("", None), ("0", False), ("false", False), ("No", False),
                                      ("1", True), (" TRUE ", True), ("yes", True)])
def test_interpret_from_env(raw, want):
  assert config.interpret_from_env({config.ENV_VAR: raw}) is want


def test_interpret_from_env_unset_and_bad():
  assert config.interpret_from_env({}) is None
  with pytest.raises(ValueError, match="GEMKIT_INTERPRET must be one of .* got 'tpu'"):
    config.interpret_from_env({config.ENV_VAR: "tpu"})


def test_default_interprets_on_cpu_and_scopes_override():
  # tests/conftest.py wraps resolve_interpret to check kernel tests; this is the function.
  resolve = getattr(config.resolve_interpret, "__wrapped__", config.resolve_interpret)
  assert resolve(None, "gpu") is True       # CPU backend, nothing set
  assert resolve(False, "gpu") is False     # an explicit value wins
  with config.interpret_mode(False):
    assert resolve(None, "gpu") is False
  assert type(resolve(None, "tpu")).__name__ == "InterpretParams"
