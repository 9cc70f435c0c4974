"""Errors an operator sees: one clear line naming the file, the line or key, and the reason."""

from __future__ import annotations


class SipguardError(Exception):
    """Base of every error the CLI turns into one line and a non-zero exit."""


class ConfigError(SipguardError):
    """A bad config or filter file: raised before anything else happens."""

    def __init__(self, path: str, where: str | int | None, reason: str) -> None:
        self.path = str(path)
        self.where = where
        self.reason = reason
        loc = self.path
        if isinstance(where, int):
            loc += f":{where}"
        elif where:
            loc += f": {where}"
        super().__init__(f"{loc}: {reason}")
