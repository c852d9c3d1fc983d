"""``python -m lightning_soo``: the ``lightning-soo`` command."""

from lightning_soo.cli import main

if __name__ == "__main__":
    main()
