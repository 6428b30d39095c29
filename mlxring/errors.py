"""Errors a user can fix: printed by the CLI as one line, never as a traceback.

Every error meant for the user as it is (bad config, a plan that does not fit, a
bad checkpoint, a wrong cluster key, a bad argument) derives from `UserError`,
so the CLI and the rank catch one type. This module imports nothing of mlxring.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad argument, file or environment, with a message that names the fix."""
