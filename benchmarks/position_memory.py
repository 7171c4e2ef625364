"""What does per-position MultiMix (segmentation) add to a training step? Peak memory and step time against ERM.

A small fully convolutional network (conv3x3 1->16, conv3x3 stride 2 16->32, conv3x3 32->32, each with BatchNorm and
ReLU, a 1x1 conv to the classes, bilinear upsampling back to the input size) trained on random images and random
masks, 5% of their pixels the ignore label 255. A step is plain torch, no Lightning (it measures the loss's cost, not
the callback's): forward, loss, backward, an SGD step. Losses, on the same network and batch:

- ``erm``: ``F.cross_entropy(logits, masks, ignore_index=255)``, the reference;
- ``chunked``: the library's ``position_multimix_loss`` over ``n`` interpolations of the whole batch, their weights
  drawn in the step (``dirichlet_weights``), in chunks of ``chunk_size`` interpolations;
- ``naive``: the same loss written here with autograd over the whole ``(n, c, P)`` mixed logits and targets (einsum
  of the logits with the per-position renormalised weights, ``log_softmax``, sum): what the chunking bounds. Left out
  (``skipped``) when its estimated peak exceeds ``--naive-limit-mb``.

Memory: the extra peak of one step over ERM's, after the warm-up steps; CPU: the peak of live tensor bytes
(``LiveTensorBytes`` of ``overhead.py``, never timed), CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats``. ``/logits``: that extra over the size of the model's own logits (``b x c x P``
float32 values). Time: median ms/step over ``--steps`` timed steps after ``--warmup``, the methods stepping in turns
(rotating order) in the same process; ratio: the median of the per-round ratios to ERM. CPU: thread CPU time, one
torch thread, glibc malloc settings that keep freed memory; CUDA: wall clock, synchronised. ``check``: once per
``n``, the chunked loss's value and gradient wrt the logits against the naive one's (``assert_close``, rtol 1e-4).
Files in ``--out``: ``position_memory.md`` and ``.csv``.

Examples::

    python benchmarks/position_memory.py --quick                      # smoke run: b=4, 16x16, n=4,16, seconds
    python benchmarks/position_memory.py                              # b=16, 64x64, 11 classes, n=16,64,256,1024
    python benchmarks/position_memory.py --device cuda --n 1024,4096  # on a GPU, more interpolations
"""

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._harness import (OUT_DIR, format_table, machine_info, print_machine, results_header, script_parser,
                                 write_csv, write_report)
from benchmarks.overhead import MB, LiveTensorBytes, clock, median, reexec_with_stable_malloc, synchronize
from lightning_multimix.positions import chunk_size, position_multimix_loss
from lightning_multimix.sampling import dirichlet_weights

IGNORE, IGNORE_FRACTION, CHANNELS = 255, 0.05, 1
#: interpolations per batch size when ``--n`` is not given (quick: the first two)
N_MULTIPLES = (1, 4, 16, 64)
#: the naive step's extra peak, in float32 values per (interpolation, position): about one per example (its
#: per-position weights) and four per class (its ``(n, c, P)`` mixed logits, targets, log-probabilities, gradients)
NAIVE_PER_BATCH, NAIVE_PER_CLASS = 1, 4


class SmallFCN(nn.Module):
    """conv3x3-BN-ReLU, strided conv3x3-BN-ReLU, conv3x3-BN-ReLU, 1x1 conv to the classes, upsampled to the input."""

    def __init__(self, classes: int, channels: int = CHANNELS) -> None:
        super().__init__()

        def block(inputs: int, outputs: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.body = nn.Sequential(*block(channels, 16), *block(16, 32, 2), *block(32, 32), nn.Conv2d(32, classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def naive_loss(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: int) -> Tensor:
    """The per-position MultiMix loss of ``(b, c, P)`` logits with autograd over the whole ``(n, c, P)`` mixed
    tensors: ignored examples get weight 0 at a position and the others are renormalised; the mean over the
    (interpolation, position) pairs that keep a label."""
    classes = logits.shape[1]
    keep = labels != ignore_index  # (b, P)
    one_hot = F.one_hot(torch.where(keep, labels, 0), classes).transpose(1, 2).to(logits.dtype)  # (b, c, P)
    per_position = weights.unsqueeze(-1) * keep.unsqueeze(1)  # (b, n, P)
    mass = per_position.sum(0)  # (n, P)
    per_position = per_position / mass.clamp_min(torch.finfo(logits.dtype).tiny)
    mixed = torch.einsum("bcp,bnp->ncp", logits, per_position)
    targets = torch.einsum("bcp,bnp->ncp", one_hot, per_position)
    losses = -(targets * torch.log_softmax(mixed, dim=1)).sum(1)  # (n, P), 0 where no example keeps a label
    return losses.sum() / (mass > 0).sum().clamp_min(1)


def naive_estimate_mb(batch: int, classes: int, positions: int, n: int) -> float:
    """The naive step's estimated extra peak (see :data:`NAIVE_PER_BATCH`)."""
    return 4 * n * positions * (NAIVE_PER_BATCH * batch + NAIVE_PER_CLASS * classes) / MB


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random images and random masks, :data:`IGNORE_FRACTION` of their pixels :data:`IGNORE`."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.size, args.size)
    x = torch.randn(args.batch_size, CHANNELS, args.size, args.size, generator=g)
    masks = torch.randint(0, args.classes, shape, generator=g)
    masks[torch.rand(shape, generator=g) < IGNORE_FRACTION] = IGNORE
    return x.to(device), masks.to(device)


def check(net: nn.Module, x: Tensor, masks: Tensor, n: int, generator: torch.Generator) -> str:
    """``ok`` if the chunked loss and its gradient wrt the logits equal the naive one's (rtol 1e-4)."""
    with torch.no_grad():
        logits = net(x).flatten(2)
    weights = dirichlet_weights(x.shape[0], n, 1.0, generator=generator, device=x.device)
    found = []
    for loss_fn in (position_multimix_loss, naive_loss):
        leaf = logits.clone().requires_grad_(True)
        loss = loss_fn(leaf, masks.flatten(1), weights, ignore_index=IGNORE)
        loss.backward()
        found.append((loss.detach(), leaf.grad))
    (value, grad), (ref_value, ref_grad) = found
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))
    return "ok"


def steps_for(net: nn.Module, x: Tensor, masks: Tensor, n: int, generator: torch.Generator,
              methods: Sequence[str]) -> dict[str, Callable[[], None]]:
    """A training step per method: forward, loss, backward, SGD step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def loss(method: str, logits: Tensor) -> Tensor:
        if method == "erm":
            return F.cross_entropy(logits, masks, ignore_index=IGNORE)
        weights = dirichlet_weights(x.shape[0], n, 1.0, generator=generator, device=x.device)
        loss_fn = position_multimix_loss if method == "chunked" else naive_loss
        return loss_fn(logits.flatten(2), masks.flatten(1), weights, ignore_index=IGNORE)

    def step(method: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(method, net(x)).backward()
        optimizer.step()

    return {method: (lambda method=method: step(method)) for method in methods}


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The peak of the memory a step allocates beyond what was live before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def measure(n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row: the check, every method's step times (in turns) and extra peak memory, for ``n`` interpolations."""
    torch.manual_seed(0)
    net = SmallFCN(args.classes).to(device)
    x, masks = make_batch(args, device)
    generator = torch.Generator(device=device).manual_seed(0)
    positions = args.size * args.size
    naive_mb = naive_estimate_mb(args.batch_size, args.classes, positions, n)
    naive = naive_mb <= args.naive_limit_mb
    methods = ("erm", "chunked", "naive") if naive else ("erm", "chunked")
    steps = steps_for(net, x, masks, n, generator, methods)
    now = clock(device)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for index in range(args.warmup + args.steps):
        shift = index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            synchronize(device)
            started = now()
            steps[method]()
            synchronize(device)
            if index >= args.warmup:
                times[method].append((now() - started) / 1e6)
    peaks = {method: peak_bytes(steps[method], device) for method in methods}
    logits_mb = 4 * args.batch_size * args.classes * positions / MB

    def extra_mb(method: str) -> float:
        return (peaks[method] - peaks["erm"]) / MB if method in peaks else float("nan")

    def ratio(method: str) -> float:
        return median([a / b for a, b in zip(times[method], times["erm"])]) if method in times else float("nan")

    return {"n": n, "chunk": chunk_size(args.batch_size, args.classes, positions),
            "erm_ms": median(times["erm"]), "chunked_ms": median(times["chunked"]), "ratio": ratio("chunked"),
            "naive_ms": median(times.get("naive", [])), "naive_ratio": ratio("naive"),
            "chunked_extra_mb": extra_mb("chunked"), "naive_extra_mb": extra_mb("naive"),
            "naive_estimate_mb": naive_mb, "logits_mb": logits_mb,
            "chunked_per_logits": extra_mb("chunked") / logits_mb, "naive_per_logits": extra_mb("naive") / logits_mb,
            "check": check(net, x, masks, n, generator) if naive else "skipped"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--n", default=None,
                        help="comma-separated interpolation counts (default: the batch size times 1, 4, 16, 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="images and masks are size x size")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of every method")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of every method")
    parser.add_argument("--naive-limit-mb", type=float, default=2000.0,
                        help="skip the naive loss where its estimated extra peak exceeds this (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: b=4, 16x16, 1 warm-up + 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.size, args.warmup, args.steps = 4, 16, 1, 2
    multiples = N_MULTIPLES[:2] if args.quick else N_MULTIPLES
    args.n = ([int(n) for n in args.n.split(",")] if args.n else [args.batch_size * k for k in multiples])
    return args


HEADERS = ("n", "chunk", "ERM ms", "MultiMix ms", "ratio", "naive ms", "naive ratio", "extra MB chunked",
           "extra MB naive", "logits MB", "chunked/logits", "naive/logits", "check")
KEYS = ("n", "chunk", "erm_ms", "chunked_ms", "ratio", "naive_ms", "naive_ratio", "chunked_extra_mb", "naive_extra_mb",
        "naive_estimate_mb", "logits_mb", "chunked_per_logits", "naive_per_logits", "check")


def cell(value: float, digits: int) -> str:
    return "skipped" if value != value else f"{value:.{digits}f}"  # nan: the naive loss was left out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if argv is None:
        reexec_with_stable_malloc(args.device)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the thread CPU time clock needs one thread
    info = machine_info(str(device))
    print_machine(info)
    settings = (f"SmallFCN, {CHANNELS}x{args.size}x{args.size} inputs, batch {args.batch_size}, {args.classes} "
                f"classes, {IGNORE_FRACTION:.0%} of pixels ignored; n {','.join(map(str, args.n))}; {args.warmup} "
                f"warm-up + {args.steps} timed steps per method, in turns; naive limit {args.naive_limit_mb:g} MB; "
                f"clock {'wall' if device.type == 'cuda' else 'thread CPU time'}")
    print("settings: " + settings, flush=True)
    started = time.perf_counter()
    rows = []
    for n in args.n:
        rows.append(measure(n, args, device))
        print(f"n={n}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    table = [[r["n"], r["chunk"], f"{r['erm_ms']:.1f}", f"{r['chunked_ms']:.1f}", f"{r['ratio']:.2f}",
              cell(r["naive_ms"], 1), cell(r["naive_ratio"], 2), f"{r['chunked_extra_mb']:.2f}",
              cell(r["naive_extra_mb"], 1), f"{r['logits_mb']:.2f}", f"{r['chunked_per_logits']:.2f}",
              cell(r["naive_per_logits"], 1), r["check"]] for r in rows]
    body = (format_table(HEADERS, table, title=f"== per-position MultiMix step against ERM, b={args.batch_size}, "
                                               f"{args.size}x{args.size}, c={args.classes}, {device} ==")
            + "\n\nextra MB: the step's peak beyond ERM's; logits MB: the model's own float32 logits (b x c x P); "
              "/logits: their ratio;\nratio: MultiMix ms / ERM ms (median of per-round ratios); check: chunked "
              "against naive, value and gradient.")
    print("\n" + body + f"\n\ntotal time: {time.perf_counter() - started:.0f} s")
    write_report(args.out, "position_memory.md", info, settings, body)
    if args.out:
        write_csv(Path(args.out, "position_memory.csv"), KEYS, [[r[k] for k in KEYS] for r in rows],
                  results_header(info, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
