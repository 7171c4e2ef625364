"""Benchmarks of lightning-multimix, run as scripts from the repository root: see benchmarks/README.md."""
