"""Shared pytest setup: TPU-interpret hygiene."""

import pytest


@pytest.fixture(autouse=True)
def _reset_tpu_interpret_state():
  """After an exception inside TPU interpret mode its state must be reset."""
  yield
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  pltpu.reset_tpu_interpret_mode_state()

