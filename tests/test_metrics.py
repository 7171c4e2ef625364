"""Embedding alignment and uniformity against hand-computed values, a brute-force reference, and under DDP."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_multimix import metrics as M
from lightning_multimix.metrics import (
    EmbeddingAlignment,
    EmbeddingUniformity,
    embedding_alignment,
    embedding_uniformity,
)

# Three points in 2-D, worked out by hand. Normalised: u1 = (1, 0), u2 = (0, 1), u3 = (-1, 0) (the inputs have
# other lengths, so normalisation is exercised). Squared distances: |u1-u2|^2 = 2, |u1-u3|^2 = 4, |u2-u3|^2 = 2.
POINTS = torch.tensor([[5.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])


def brute_force(embeddings: torch.Tensor, labels: list[int], t: float = 2.0) -> tuple[float, float]:
    """Alignment and uniformity by explicit loops over ordered pairs i != j, in Python floats."""
    rows = [[float(v) for v in row] for row in embeddings]
    units = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]
    same, all_pairs = [], []
    for i, j in itertools.permutations(range(len(units)), 2):
        d2 = sum((a - b) ** 2 for a, b in zip(units[i], units[j]))
        all_pairs.append(math.exp(-t * d2))
        if labels[i] == labels[j]:
            same.append(d2)
    return sum(same) / len(same), math.log(sum(all_pairs) / len(all_pairs))


def test_three_points_by_hand() -> None:
    # labels 0, 0, 1: the only same-class pair is (u1, u2), at squared distance 2
    assert embedding_alignment(POINTS, torch.tensor([0, 0, 1])).item() == pytest.approx(2.0)
    # labels 0, 1, 0: the pair (u1, u3), at squared distance 4
    assert embedding_alignment(POINTS, torch.tensor([0, 1, 0])).item() == pytest.approx(4.0)
    # all one class: mean of 2, 4, 2
    assert embedding_alignment(POINTS, torch.tensor([0, 0, 0])).item() == pytest.approx(8 / 3)
    # uniformity: log of the mean of exp(-2 * 2), exp(-2 * 4), exp(-2 * 2)
    expected = math.log((2 * math.exp(-4.0) + math.exp(-8.0)) / 3)
    assert embedding_uniformity(POINTS).item() == pytest.approx(expected, rel=1e-6)
    # t = 1: exp(-2), exp(-4), exp(-2)
    expected_t1 = math.log((2 * math.exp(-2.0) + math.exp(-4.0)) / 3)
    assert embedding_uniformity(POINTS, t=1.0).item() == pytest.approx(expected_t1)


def test_identical_and_antipodal_points() -> None:
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert embedding_alignment(same, torch.tensor([4, 4, 4])).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_uniformity(same).item() == pytest.approx(0.0, abs=1e-6)  # log mean exp(0)
    opposite = torch.tensor([[0.0, 1.0], [0.0, -3.0]])
    assert embedding_alignment(opposite, torch.tensor([1, 1])).item() == pytest.approx(4.0)
    assert embedding_uniformity(opposite).item() == pytest.approx(-8.0)


def test_against_brute_force_random() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 4, generator=g) * 3
    labels = [0, 1, 2, 0, 1, 2, 0, 0, 3, 1, 2, 2, 0]
    alignment, uniformity = brute_force(x, labels)
    assert embedding_alignment(x, torch.tensor(labels)).item() == pytest.approx(alignment, rel=1e-5)
    assert embedding_uniformity(x).item() == pytest.approx(uniformity, rel=1e-5)


def test_uniformity_blocks_match_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    whole = embedding_uniformity(x)
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 7 * 50)  # blocks of 7 rows: the diagonal crosses block edges
    assert embedding_uniformity(x).item() == pytest.approx(whole.item(), rel=1e-6)
    assert embedding_uniformity(x).item() == pytest.approx(brute_force(x, [0] * 50)[1], rel=1e-5)


def test_undefined_cases_are_nan() -> None:
    assert math.isnan(embedding_alignment(POINTS, torch.tensor([0, 1, 2])).item())  # no same-class pair
    assert math.isnan(embedding_uniformity(POINTS[:1]).item())
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' warning
        assert math.isnan(EmbeddingAlignment(2, 2).compute().item())
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(EmbeddingUniformity().compute().item())


def test_metrics_accumulate_all_pairs_across_batches() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    alignment, uniformity = EmbeddingAlignment(num_classes=5, embedding_dim=6), EmbeddingUniformity()
    for start, stop in ((0, 1), (1, 17), (17, 40)):  # pairs across batches count
        alignment.update(x[start:stop], y[start:stop])
        uniformity.update(x[start:stop])
    reference = brute_force(x, y.tolist())
    assert alignment.compute().item() == pytest.approx(reference[0], rel=1e-5)
    assert uniformity.compute().item() == pytest.approx(reference[1], rel=1e-5)
    # not the mean of per-batch values
    per_batch = (embedding_uniformity(x[1:17]).item() + embedding_uniformity(x[17:]).item()) / 2
    assert abs(per_batch - reference[1]) > 1e-3
    alignment.reset()
    alignment.update(x[:3], y[:3])
    assert alignment.counts.sum().item() == 3


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        embedding_uniformity(torch.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        embedding_alignment(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        embedding_alignment(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="t=0"):
        embedding_uniformity(POINTS, t=0)
    metric = EmbeddingAlignment(num_classes=2, embedding_dim=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metric.update(POINTS, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="embedding_dim=2"):
        metric.update(torch.zeros(3, 5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="num_classes=0"):
        EmbeddingAlignment(num_classes=0, embedding_dim=2)


# ---------------------------------------------------------------------------------------------------- DDP


SHARDS = (torch.arange(0, 11), torch.arange(11, 29))  # uneven


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    """29 embeddings in 5-D, labels in 0..2 (class 3 never occurs; rank 1's shard has no class 0)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 5, generator=g)
    y = torch.randint(0, 3, (29,), generator=g)
    y[11:][y[11:] == 0] = 1
    return x, y


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, y = _ddp_data()
        alignment, uniformity = EmbeddingAlignment(num_classes=4, embedding_dim=5), EmbeddingUniformity()
        for part in SHARDS[rank].tensor_split(3):
            alignment.update(x[part], y[part])
            uniformity.update(x[part])
        result = {"alignment": alignment.compute().item(), "uniformity": uniformity.compute().item()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_equals_single_process_on_all_data(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y = _ddp_data()
    expected_alignment, expected_uniformity = brute_force(x, y.tolist())
    for rank in range(2):  # every rank gets the global value
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["alignment"] == pytest.approx(expected_alignment, rel=1e-5)
        assert result["uniformity"] == pytest.approx(expected_uniformity, rel=1e-5)
    # which differs from what either rank alone would report
    for shard in SHARDS:
        assert abs(embedding_uniformity(x[shard]).item() - expected_uniformity) > 1e-3
        assert abs(embedding_alignment(x[shard], y[shard]).item() - expected_alignment) > 1e-3
