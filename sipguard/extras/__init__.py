"""Operator extras a running daemon can carry, each off unless configured: Prometheus metrics
(`metrics`), Kamailio's htable mirror (`htable`), scheduled blocklists (`blocklists`).

The composition root (sipguard/wiring.py) builds the ones the config asks for; none of them is
imported otherwise. They never decide a ban: blocklists hand theirs to the ban book, the htable is
a mirror behind the kernel enforcer, metrics only count.
"""
