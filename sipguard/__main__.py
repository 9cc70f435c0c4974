"""`python -m sipguard` and the `sipguard` console script."""

import gc


def main() -> None:
    """Import the CLI with the cyclic garbage collector paused, then run the command.

    Importing typer, pydantic and the pipeline allocates some 100,000 objects and frees almost
    none, so collector passes during start-up are pure cost (tens of ms on every command). The
    imported objects are then frozen out of later collections, which stay on for the daemon.
    """
    gc.disable()
    try:
        from .cli import entry
    finally:
        gc.freeze()
        gc.enable()
    entry()


if __name__ == "__main__":
    main()
