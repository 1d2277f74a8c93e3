"""The errors a user can cause, shared by every package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A job that cannot run as configured; the message lists every problem and its fix."""


def raise_if_any(errors: list[str], what: str = "invalid configuration") -> None:
    """Raise one :class:`ConfigError` listing ``errors`` (nothing when the list is empty)."""
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{what} ({len(errors)} problem(s)):\n{lines}")
