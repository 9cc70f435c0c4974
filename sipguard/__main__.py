"""`python -m sipguard` is the `sipguard` command."""

from .cli import entry

entry()
