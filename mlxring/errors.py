"""Errors a user can fix: printed by the CLI as one line, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A bad argument or environment, with a message that names the fix."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception type whose message is meant for the user as it is."""
    from mlxring.config import ConfigError
    from mlxring.crypto.keys import ClusterKeyError
    from mlxring.plan import PlanError
    from mlxring.weights import CheckpointError

    return (UserError, ConfigError, PlanError, CheckpointError, ClusterKeyError)
