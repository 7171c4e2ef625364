"""Runnable examples: ``python -m examples.train fit --config examples/configs/<name>.yaml`` from the repo root."""
