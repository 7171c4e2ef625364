"""Is ``F.cross_entropy`` with probability targets equal to the written-out soft cross-entropy, and as fast?

What is measured
----------------
The loss of every interpolated example is ``-sum_c t_c log softmax(l)_c``. For the layouts the package uses (rows
``(n, c)``, class-major ``(c, n)``, dense ``(r, c, n)``), the written-out formula and
:func:`lightning_multimix.losses.soft_cross_entropy` (``F.cross_entropy`` laid out per class dimension) are timed
forward and backward, interleaved call by call, one thread, thread CPU time, and compared in value and gradient.
Every layout runs in ``--processes`` fresh processes: the time of the same arithmetic moves by up to 2x from one
process to the next here (with where its buffers land), and both ways share each process's luck.

How to read the output
----------------------
The times are medians over processes of each process's median; ``ratio`` is the median over processes of the
ratio within a process (``F.cross_entropy`` over written out), with the smallest and largest beside it.

Example::

    python benchmarks/cross_entropy.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._harness import RESULTS_DIR, format_table, machine_info, print_machine, run_child, write_report
from benchmarks._timing import median, set_clock, time_interleaved
from lightning_multimix.losses import soft_cross_entropy

SHAPES = (("rows (n, c)", (1000, 10), -1), ("class-major (c, n)", (10, 1000), 0),
          ("class-major (c, n)", (10, 10000), 0), ("dense (r, c, n)", (49, 10, 1000), 1))
WAYS = ("written out", "F.cross_entropy")


def written_out(logits: torch.Tensor, targets: torch.Tensor, dim: int) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits.float(), dim=dim)).sum(dim).mean()


def _child(index: int, repeats: int) -> None:
    """One layout in this process: both ways' median times (ms), and how far apart their values are."""
    torch.set_num_threads(1)
    set_clock("cpu")
    _, shape, dim = SHAPES[index]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g, requires_grad=True)
    targets = torch.rand(*shape, generator=g)
    targets = targets / targets.sum(dim, keepdim=True)
    a, b = written_out(logits, targets, dim), soft_cross_entropy(logits, targets, dim=dim)
    grad_a, grad_b = torch.autograd.grad(a, logits)[0], torch.autograd.grad(b, logits)[0]
    times = time_interleaved({WAYS[0]: lambda: written_out(logits, targets, dim).backward(),
                              WAYS[1]: lambda: soft_cross_entropy(logits, targets, dim=dim).backward()},
                             torch.device("cpu"), repeats)
    print(json.dumps({**{way: median(times[way]) for way in WAYS}, "loss diff": float((a - b).detach().abs()),
                      "grad diff": float((grad_a - grad_b).abs().max())}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="interleaved calls per way in each process")
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per layout")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    info = machine_info("cpu")
    info["torch_threads"] = "1"  # in the measuring processes (this one only starts them)
    print_machine(info)
    results: list[list[dict]] = [[] for _ in SHAPES]
    for _ in range(args.processes):  # rounds over the layouts: load and memory placement hit them alike
        for index in range(len(SHAPES)):
            results[index].append(run_child(__file__, index, args.repeats))
    rows = []
    for (name, shape, _), runs in zip(SHAPES, results):
        ratios = sorted(run[WAYS[1]] / run[WAYS[0]] for run in runs)
        rows.append([name, "x".join(map(str, shape)),
                     *(f"{statistics.median(run[way] for run in runs):.3f}" for way in WAYS),
                     f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                     f"{max(run['loss diff'] for run in runs):.1e}", f"{max(run['grad diff'] for run in runs):.1e}"])
    table = format_table(("layout", "shape", "written out (ms)", "F.cross_entropy (ms)", "ratio (min-max)",
                          "|loss diff|", "max |grad diff|"), rows,
                         title="== soft cross-entropy, forward + backward, medians over processes, one thread ==")
    print(table + "\n")
    write_report(args.out, "cross_entropy.md", info,
                 f"{args.repeats} interleaved calls each, {args.processes} fresh processes per layout", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
