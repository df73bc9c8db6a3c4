"""Fixtures every test of the repository's root tests uses."""
from avalon.testing.fixtures import fresh_tuning_turn  # noqa: F401  (autouse)
