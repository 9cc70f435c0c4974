"""The fleet's Redis scripts, read from the package data files in `lua/` (shipped in the wheel).

Text only: registering and calling them is the bridge's job; nothing here talks to Redis.
"""

from __future__ import annotations

from importlib.resources import files


def lua(name: str) -> str:
    """The text of lua/NAME.lua from this package."""
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


SCORE_LUA = lua("score")  # one call per batch: windows, threshold, escalation, the ban claimed atomically
PUBLISH_LUA = lua("publish")  # one outbox entry: last-writer-wins ban, deduplicated unban
HDEL_IF_LUA = lua("hdel_if")  # compare-and-delete of a hash field (GC)
