"""Benchmarks of lightning-multimix: step-time overhead (``overhead.py``) and accuracy (``accuracy.py``).

Run them as scripts from the repository root, e.g. ``python benchmarks/overhead.py --quick``; each module docstring
says what is measured and how to read the output.
"""
