"""Which way of computing each product of the MultiMix objective is fastest, with the same values?

What is measured
----------------
The products the logit-space and dense objectives spend their time in, each computed the way the package does
it and the way it could be done instead, interleaved call by call, one intra-op thread, thread CPU time
(``m = 128`` examples, ``c = 10`` classes, ``r = 49`` positions, as the small CNN of ``benchmarks/overhead.py``):

* mixed logits, forward and backward: class-major ``(c x m) @ (m x n)`` on a transposed ``(c, m)`` view of the
  logits, as :func:`lightning_multimix.multimix_objective` computes them, against the same with a contiguous
  ``(c, m)`` copy (the package's way before), and against row-major ``(n x m) @ (m x c)``;
* dense head at every position, forward and backward, on the ``(m, r, d)`` view of a CNN's ``(m, d, 7, 7)`` feature
  map (``d = 128``): class-major batched products on the map where it lies
  (:func:`lightning_multimix.dense.position_linear`) against ``F.linear`` on a contiguous copy (the package's way
  before);
* and, not a product, input mixup of a batch of ``m`` images ``(1, 28, 28)`` with its partners
  (:func:`lightning_multimix.interpolation.mix_with_partner`, partners by ``index_select``) against partners by
  advanced indexing ``values[partner]`` (the package's way before); ``n`` does not apply.

How to read the output
----------------------
``package`` and ``other`` are medians in ms, ``ratio`` is package / other (below 1: the package's way is faster),
``max |diff|`` the largest difference between the two results (float32 rounding).

Example::

    python benchmarks/kernels.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks._harness import RESULTS_DIR, format_table, one_cpu_thread, write_report
from benchmarks._timing import median, time_interleaved
from lightning_multimix.dense import position_linear
from lightning_multimix.interpolation import mix_with_partner
from lightning_multimix.sampling import dirichlet_weights

M, C, D = 128, 10, 128


def _forward_backward(product: Callable[[Tensor], Tensor], logits: Tensor) -> Callable[[], Tensor]:
    def run() -> Tensor:
        out = product(logits)
        out.sum().backward()
        return out.detach()
    return run


def cases(n: int) -> list[tuple[str, str, Callable[[], Tensor], Callable[[], Tensor]]]:
    """``(product, other way, package's way, other way)``; both ways return the same tensor."""
    g = torch.Generator().manual_seed(0)
    weights = dirichlet_weights(M, n, generator=g)
    logits = torch.randn(M, C, generator=g, requires_grad=True)
    package_logits = _forward_backward(lambda v: v.T @ weights, logits)
    found = [("mixed logits, fwd + bwd", "contiguous (c, m) copy @ (m x n)", package_logits,
              _forward_backward(lambda v: v.T.contiguous() @ weights, logits)),
             ("mixed logits, fwd + bwd", "row-major (n x m) @ (m x c)", package_logits,
              _forward_backward(lambda v: (weights.T @ v).T, logits))]
    if n <= 1000:
        # the head at every position of a CNN's (m, d, 7, 7) map, read as the (m, r, d) view dense mode captures
        feature_map = torch.randn(M, D, 7, 7, generator=g, requires_grad=True)
        head = torch.nn.Linear(D, C)

        def view(v: Tensor) -> Tensor:
            return v.flatten(2).transpose(1, 2)

        found.append(("dense head per position, fwd + bwd", "F.linear on a contiguous (m, r, d) copy",
                      _forward_backward(lambda v: position_linear(view(v), head.weight, head.bias), feature_map),
                      _forward_backward(lambda v: F.linear(view(v).contiguous(), head.weight, head.bias),
                                        feature_map)))
    return found


def batch_cases() -> list[tuple[str, str, Callable[[], Tensor], Callable[[], Tensor]]]:
    """Input mixup's mixing of a batch of images, as :func:`cases`."""
    g = torch.Generator().manual_seed(0)
    images, lam = torch.randn(M, 1, 28, 28, generator=g), torch.rand((), generator=g)
    partner = torch.randperm(M, generator=g)
    return [(f"input mixup, {M} images 1x28x28", "advanced indexing values[partner]",
             lambda: mix_with_partner(images, lam, partner), lambda: torch.lerp(images[partner], images, lam))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1000,10000")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    info = one_cpu_thread()
    found = [(str(n), case) for n in map(int, args.n.split(",")) for case in cases(n)]
    rows = []
    for n, (name, other_way, package, other) in found + [("-", case) for case in batch_cases()]:
        difference = float((package() - other()).abs().max())
        times = time_interleaved({"package": package, "other": other}, torch.device("cpu"), args.repeats)
        ours, theirs = median(times["package"]), median(times["other"])
        rows.append([name, n, other_way, f"{ours:.3f}", f"{theirs:.3f}", f"{ours / theirs:.2f}", f"{difference:.1e}"])
    table = format_table(("product", "n", "other way", "package (ms)", "other (ms)", "ratio", "max |diff|"), rows,
                         title=f"== products of the objective, and input mixup, m = {M}, c = {C}, medians ==")
    print(table + "\n")
    write_report(args.out, "kernels.md", info, f"n={args.n}, {args.repeats} interleaved calls each", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
