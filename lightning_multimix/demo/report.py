"""The demo's account of a run: the comparison table and the results files (JSON, CSV, Markdown)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Union

TABLE_COLUMNS = (("method", "method", "{}"), ("epochs", "epochs", "{:d}"), ("test acc", "test_acc", "{:.4f}"),
                 ("best acc", "best_acc", "{:.4f}"), ("ECE", "ece", "{:.4f}"), ("alignment", "alignment", "{:.4f}"),
                 ("uniformity", "uniformity", "{:.4f}"), ("s/epoch", "sec_per_epoch", "{:.1f}"))
#: the table of the multi-label task: macro mAP after the last and the best epoch, macro F1 at 0.5
MULTILABEL_COLUMNS = (("method", "method", "{}"), ("epochs", "epochs", "{:d}"), ("test mAP", "test_map", "{:.4f}"),
                      ("best mAP", "best_map", "{:.4f}"), ("test F1", "test_f1", "{:.4f}"),
                      ("s/epoch", "sec_per_epoch", "{:.1f}"))
#: the table of the segmentation task: mean IoU over the classes after the last and the best epoch
SEGMENTATION_COLUMNS = (("method", "method", "{}"), ("epochs", "epochs", "{:d}"), ("test mIoU", "test_miou", "{:.4f}"),
                        ("best mIoU", "best_miou", "{:.4f}"), ("s/epoch", "sec_per_epoch", "{:.1f}"))


def format_table(results: Sequence[dict], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """The comparison table, one row per method, as Markdown (``columns``: title, result key, format).

    Example:
        >>> print(format_table([{"method": "erm", "epochs": 1, "test_acc": 0.5, "best_acc": 0.5, "ece": 0.1,
        ...                      "alignment": 1.0, "uniformity": -2.0, "sec_per_epoch": 3.0}]))
        | method | epochs | test acc | best acc | ECE    | alignment | uniformity | s/epoch |
        |--------|--------|----------|----------|--------|-----------|------------|---------|
        | erm    | 1      | 0.5000   | 0.5000   | 0.1000 | 1.0000    | -2.0000    | 3.0     |
    """
    rows = [[fmt.format(r[key]) for _, key, fmt in columns] for r in results]
    headers = [title for title, _, _ in columns]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def save_results(results: Sequence[dict], out: Path, config: dict,
                 columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> dict[str, Path]:
    """Write ``results.json`` (config, per-method numbers and history), ``results.csv`` and ``table.md``."""
    scalars = [{k: v for k, v in r.items() if k not in ("embeddings", "labels", "predictions")} for r in results]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "table.md"}
    paths["json"].write_text(json.dumps({"config": config, "results": scalars}, indent=2) + "\n")
    fields = [key for _, key, _ in columns] + ["best_epoch", "steps", "seed"]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(scalars)
    paths["table"].write_text(format_table(results, columns) + "\n")
    return paths


def prepare_output_dir(out: Union[str, os.PathLike]) -> Path:
    """Create ``out`` if needed and check that files can be written in it; raise ``OSError`` naming it otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(f"--out '{path}' is not a writable directory ({type(err).__name__}: {err.strerror or err}). "
                      "Pass --out pointing to a directory you can write to.") from None
    return path.resolve()
