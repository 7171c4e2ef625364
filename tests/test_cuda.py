"""On a GPU: the callback's work in a training step makes no host-device synchronisation (skipped without CUDA).

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call (``.item()``, ``.tolist()``, a
``nonzero``, a blocking copy) into an error. It is on while the callback's step runs, and off while the user's own
``training_step`` runs inside it (the user's code may synchronise; that is not ours to forbid). The first batch is
left out: it checks what it captured (a read, once), and so is every ``check_every_n_steps``-th batch (the health
flag is read then, by design).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import lightning_multimix.step as step_module  # noqa: E402
from helpers import TinyCNN, TinyMLP, loader, trainer  # noqa: E402
from lightning_multimix import Dense, MultiMix, SelfDistillation  # noqa: E402


@pytest.fixture
def no_sync_in_the_callback(monkeypatch):
    call = step_module.TrainingStep.__call__
    checked = []

    def guarded(self, *args, **kwargs):
        if self.stream.batches_seen == 0:  # the first batch reads what it checks
            return call(self, *args, **kwargs)
        original = self.original

        def users_own(*a, **k):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return original(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        self.original = users_own
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = call(self, *args, **kwargs)
            checked.append(True)
            return result
        finally:
            torch.cuda.set_sync_debug_mode(0)
            self.original = original

    monkeypatch.setattr(step_module.TrainingStep, "__call__", guarded)
    return checked


@pytest.mark.parametrize("options", [{}, {"probability": 1.0}, {"probability": 0.0}, {"mode": "pairs"},
                                     {"dense": Dense()}, {"distill": SelfDistillation()}],
                         ids=["protocol", "multimix", "input-mixup", "pairs", "dense", "distill"])
def test_a_training_step_makes_no_host_device_synchronisation(no_sync_in_the_callback, options):
    image = "dense" in options
    model = TinyCNN() if image else TinyMLP()
    # no MultiMix batch at probability 0; pairs take n = b
    n_tuples = {} if options.get("probability") == 0.0 or options.get("mode") == "pairs" else {"n_tuples": 64}
    callback = MultiMix(seed=0, check_every_n_steps=1000, **n_tuples, **options)
    trainer([callback], accelerator="gpu", max_steps=6, log_every_n_steps=1000).fit(
        model, loader(n=48, batch_size=8, image=image))
    assert len(no_sync_in_the_callback) == 5


def test_16_mixed_on_gpu_trains_with_a_float32_loss():
    losses = []

    class Spy(MultiMix):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            losses.append(outputs["loss"].detach())

    trainer([Spy(n_tuples=64, seed=0)], accelerator="gpu", precision="16-mixed", max_steps=4).fit(
        TinyMLP(), loader(n=32, batch_size=8))
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)


def test_labels_per_position_make_no_host_device_synchronisation(no_sync_in_the_callback):
    from torch.utils.data import DataLoader, TensorDataset

    from test_positions import Segmenter, masks

    images, labels = masks(n=48)
    callback = MultiMix(seed=0, check_every_n_steps=1000, n_tuples=64)  # the protocol: both kinds of batch
    trainer([callback], accelerator="gpu", max_steps=6, log_every_n_steps=1000).fit(
        Segmenter(lr=0.1), DataLoader(TensorDataset(images, labels), batch_size=8))
    assert len(no_sync_in_the_callback) == 5
