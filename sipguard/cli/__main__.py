"""`python -m sipguard.cli`: the same as `python -m sipguard`."""

from sipguard.__main__ import main

main()
