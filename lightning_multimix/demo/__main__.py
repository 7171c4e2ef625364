"""``python -m lightning_multimix.demo``: see :mod:`lightning_multimix.demo.cli`."""

from lightning_multimix.demo.cli import main

if __name__ == "__main__":
    main()
