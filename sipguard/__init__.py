"""sipguard: read Kamailio's log, score attacking sources, make the kernel drop them."""

__version__ = "0.1.0"
