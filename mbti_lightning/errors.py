"""The error a user's input can cause: the command prints its message, without a traceback, and exits 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a file, a setting, data that changed): the message names what is at fault and what to do."""
