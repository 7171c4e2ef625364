"""Benchmarks of lightning-multimix: accuracy (``accuracy.py``, ``sweep.py``, the papers' CIFAR protocol in
``paper_protocol.py``), step-time overhead and host cost (``overhead.py``, ``step_cost.py``), and the versions the package
works with (``versions.py``); ``benchmarks/README.md`` lists them all.

Run them as scripts from the repository root, e.g. ``python benchmarks/overhead.py --quick``; each module docstring
says what is measured and how to read the output.
"""
