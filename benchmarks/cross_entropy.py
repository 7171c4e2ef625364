"""Is ``F.cross_entropy`` with probability targets equal to the written-out soft cross-entropy, and as fast?

What is measured
----------------
The loss of every interpolated example is ``-sum_c t_c log softmax(l)_c``. For the layouts the package uses (rows
``(n, c)``, class-major ``(c, n)``, dense ``(r, c, n)``), the written-out formula and
:func:`lightning_multimix.losses.soft_cross_entropy` (``F.cross_entropy`` laid out per class dimension) are timed
forward and backward, interleaved call by call, one thread, thread CPU time, and compared in value and gradient.

Example::

    python benchmarks/cross_entropy.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._harness import RESULTS_DIR, format_table, one_cpu_thread, write_report
from benchmarks._timing import median, time_interleaved
from lightning_multimix.losses import soft_cross_entropy

SHAPES = (("rows (n, c)", (1000, 10), -1), ("class-major (c, n)", (10, 1000), 0),
          ("class-major (c, n)", (10, 10000), 0), ("dense (r, c, n)", (49, 10, 1000), 1))


def written_out(logits: torch.Tensor, targets: torch.Tensor, dim: int) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits.float(), dim=dim)).sum(dim).mean()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    info = one_cpu_thread()
    rows = []
    for name, shape, dim in SHAPES:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(*shape, generator=g, requires_grad=True)
        targets = torch.rand(*shape, generator=g)
        targets = targets / targets.sum(dim, keepdim=True)
        a, b = written_out(logits, targets, dim), soft_cross_entropy(logits, targets, dim=dim)
        grad_a, grad_b = torch.autograd.grad(a, logits)[0], torch.autograd.grad(b, logits)[0]
        times = time_interleaved({"written out": lambda: written_out(logits, targets, dim).backward(),
                                  "F.cross_entropy": lambda: soft_cross_entropy(logits, targets, dim=dim).backward()},
                                 torch.device("cpu"), args.repeats)
        written, package = median(times["written out"]), median(times["F.cross_entropy"])
        rows.append([name, "x".join(map(str, shape)), f"{written:.3f}", f"{package:.3f}", f"{package / written:.2f}",
                     f"{float((a - b).detach().abs()):.1e}", f"{float((grad_a - grad_b).abs().max()):.1e}"])
    table = format_table(("layout", "shape", "written out (ms)", "F.cross_entropy (ms)", "ratio", "|loss diff|",
                          "max |grad diff|"), rows,
                         title="== soft cross-entropy, forward + backward, medians, one thread ==")
    print(table)
    write_report(args.out, "cross_entropy.md", info, f"{args.repeats} interleaved calls each", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
