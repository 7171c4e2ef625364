"""The demo's pictures: training curves per method, a 2-D PCA of the test embeddings per method, and test images with
their true and predicted masks (the segmentation task).

Matplotlib is imported inside the plotting functions, which draw on a ``matplotlib.figure.Figure`` rendered by the
Agg canvas, without pyplot: no window opens and no global backend is changed. Importing this module needs only torch
(``pip install lightning-multimix[demo]`` for the pictures); :func:`pca_2d` is plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor


def pca_2d(x: Tensor) -> Tensor:
    """Project the rows of ``x`` (N, d) onto their first two principal axes (exact, by SVD of the centred data).

    Each axis' sign is fixed so that its largest-magnitude loading is positive, so the picture does not flip
    between runs.

    Example:
        >>> x = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 1.0], [4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> pca_2d(x).shape
        torch.Size([4, 2])
        >>> torch.allclose(pca_2d(x).var(0, correction=0).sum(), (x - x.mean(0)).pow(2).sum(1).mean())
        True
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_2d: need an (N, d) tensor with N >= 2, got shape {tuple(x.shape)}.")
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]
    if axes.shape[0] < 2:  # d == 1: a zero second axis
        axes = torch.cat([axes, torch.zeros_like(axes)])
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    return (centred @ axes.T).float()


def _figure(**kwargs: Any) -> Any:
    """A ``Figure`` on an Agg canvas (no pyplot, no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("The demo's plots need matplotlib: `pip install lightning-multimix[demo]`.") from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def plot_curves(results: Sequence[dict], path: Union[str, Path], metric: str = "acc",
                metric_name: str = "test accuracy") -> Path:
    """Per-epoch curves of every method: training loss (the optimised objective), test loss and the test ``metric``
    (the history's ``val_<metric>``, titled ``metric_name``; e.g. ``"map"``, ``"test mAP"`` for multi-label data).

    ``results`` are :func:`lightning_multimix.demo.training.run_method` outputs (their ``"method"`` and ``"history"``).
    """
    fig = _figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    panels = (("train_loss", "training loss (optimised objective)"), ("val_loss", "test loss"),
              (f"val_{metric}", metric_name))
    for ax, (key, title) in zip(axes, panels):
        for result in results:
            points = [(h["epoch"], h[key]) for h in result["history"] if h.get(key) is not None]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", label=result["method"])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_embeddings(results: Sequence[dict], path: Union[str, Path], class_names: Optional[Sequence[str]] = None,
                    max_points: int = 2000) -> Path:
    """One panel per method: the 2-D PCA (:func:`pca_2d`) of its L2-normalised test embeddings, coloured by class.

    Normalised, because alignment and uniformity are measured on the sphere. At most ``max_points`` points (the
    first ones) are drawn per panel.
    """
    count = len(results)
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig = _figure(figsize=(4.2 * cols, 4.2 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = _colormap("tab10" if (class_names is None or len(class_names) <= 10) else "tab20")
    for ax, result in zip(axes.flat, results):
        embeddings = torch.nn.functional.normalize(result["embeddings"][:max_points].float(), dim=1)
        labels = result["labels"][:max_points]
        points = pca_2d(embeddings)
        for c in labels.unique().tolist():
            mask = labels == c
            name = class_names[c] if class_names is not None else str(c)
            ax.scatter(points[mask, 0], points[mask, 1], s=4, color=cmap(c % cmap.N), label=name, alpha=0.7)
        ax.set_title(f"{result['method']}  (acc {result['test_acc']:.3f})")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    handles, labels_ = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=min(len(labels_), 10), markerscale=3, frameon=False)
    fig.suptitle("Test embeddings, L2-normalised, first two principal components")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def mask_colors(num_classes: int, background: Optional[int] = None) -> list[tuple[float, float, float, float]]:
    """A fixed colour per class of a mask: tab10's (tab20's beyond 10 classes) in class order, and black for the
    ``background`` class, as the composites' empty pixels."""
    cmap = _colormap("tab10" if num_classes - (background is not None) <= 10 else "tab20")
    colors, item = [], 0
    for c in range(num_classes):
        if c == background:
            colors.append((0.0, 0.0, 0.0, 1.0))
        else:
            colors.append(cmap(item % cmap.N))
            item += 1
    return colors


def plot_segmentations(results: Sequence[dict], images: Tensor, masks: Tensor, path: Union[str, Path],
                       class_names: Sequence[str], background: Optional[int] = None, count: int = 4) -> Path:
    """One row per test image (the first ``count``): the image, its true mask, then each method's predicted mask, in
    the colours of :func:`mask_colors` with a legend of ``class_names``.

    ``images``: ``(N, C, H, W)`` raw test images (``uint8`` or floats), ``masks``: ``(N, H, W)`` true masks;
    ``results``: :func:`lightning_multimix.demo.training.run_method` outputs for segmentation data (their
    ``"method"``, ``"predictions"`` and ``"test_miou"``).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    count = min(count, images.shape[0])
    colors = mask_colors(len(class_names), background)
    cmap = ListedColormap(colors)
    columns = 2 + len(results)
    fig = _figure(figsize=(2.2 * columns, 2.2 * count + 0.9))
    axes = fig.subplots(count, columns, squeeze=False)
    titles = ["image", "true mask", *(f"{r['method']} (mIoU {r['test_miou']:.3f})" for r in results)]
    for row in range(count):
        image = images[row].float()
        shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0) / image.max().clamp_min(1e-8)
        panels = [masks[row], *(r["predictions"][row] for r in results)]
        axes[row][0].imshow(shown, cmap="gray" if image.shape[0] == 1 else None)
        for ax, mask in zip(axes[row][1:], panels):
            ax.imshow(mask, cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest")
        for column, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[column], fontsize=8)
    handles = [Patch(facecolor=color, edgecolor="grey", label=name) for name, color in zip(class_names, colors)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.suptitle("Test composites: true and predicted masks")
    fig.tight_layout(rect=(0, 0.8 / (2.2 * count + 0.9), 1, 0.97), h_pad=2.0)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_benchmark(summary: Sequence[dict[str, Any]], regimes: Sequence[str], path: Path, title: str,
                   descriptions: dict[str, str], measures: Sequence[tuple[str, str, float, str]]) -> Path:
    """``benchmarks/accuracy.py``'s picture, per regime: the first of ``measures`` (bars, +- std) with the second
    (dots; the last and the best epoch's), and the third below. ``summary``: rows with ``regime``, ``method``,
    ``<key>_mean``, ``<key>_std`` for the ``(title, key, scale, format)`` of ``measures``."""
    (top_title, last, _, _), (best_title, best_key, _, _), (bottom_title, bottom_key, _, _) = measures[:3]
    fig = _figure(figsize=(5.2 * len(regimes), 7.5))
    axes = fig.subplots(2, len(regimes), squeeze=False)
    cmap = _colormap("tab10")
    for column, regime in enumerate(regimes):
        rows = [r for r in summary if r["regime"] == regime]
        names = [r["method"] for r in rows]
        colors = [cmap(i % 10) for i in range(len(rows))]
        top, bottom = axes[0][column], axes[1][column]
        top.bar(names, [r[f"{last}_mean"] for r in rows], yerr=[r[f"{last}_std"] for r in rows], color=colors,
                capsize=3)
        top.plot(names, [r[f"{best_key}_mean"] for r in rows], "k.", label=best_title)
        best = max(r[f"{best_key}_mean"] for r in rows)
        # a collapsed method (more than 30 points below the best) would flatten the others: its bar is cut
        low = max(0.0, min(r[f"{last}_mean"] for r in rows if r[f"{last}_mean"] > best - 30.0) - 5.0)
        top.set_ylim(low, min(100.0, best + 2.0))
        for i, r in enumerate(rows):
            if r[f"{last}_mean"] < low:
                top.annotate(f"{r[f'{last}_mean']:.1f}\n(below)", (i, low), xytext=(0, 4),
                             textcoords="offset points", ha="center", fontsize=7)
        top.set_title(f"{regime}: {descriptions[regime]}", fontsize=8)
        top.set_ylabel(f"{top_title} (dot: {best_title})")
        bottom.bar(names, [r[f"{bottom_key}_mean"] for r in rows], yerr=[r[f"{bottom_key}_std"] for r in rows],
                   color=colors, capsize=3)
        bottom.set_ylabel(bottom_title)
        for ax in (top, bottom):
            ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
