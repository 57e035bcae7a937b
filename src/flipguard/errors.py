"""Error types: every user-facing failure is one clear line naming the file/field."""

from __future__ import annotations


class FlipguardError(Exception):
    """Base class for errors reported to the user as one line (CLI exit code 2)."""


class ConfigError(FlipguardError, ValueError):
    """An invalid option, field or file content; the message names it."""
