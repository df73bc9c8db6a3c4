"""Fixtures every test of avalon-zoo uses."""
from avalon.testing.fixtures import fresh_tuning_turn  # noqa: F401  (autouse)
