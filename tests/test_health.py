"""Health checks: a non-finite loss or labels out of range raise a clear error naming the batches since the last
read, with no host-device synchronisation at every step on an accelerator.

The callback counts labels out of range and sums the loss on the device at every batch without synchronising, and
reads both at the first batch, then every ``check_every_n_steps`` batches, at an epoch's end and at the end of
training, on every device alike.
"""

import pytest
import torch
from torch import nn

from helpers import NUM_CLASSES, TinyMLP, loader, trainer
from lightning_multimix import MultiMix, MultiMixError
from lightning_multimix.monitor import HealthFlag


class NaNAt(TinyMLP):
    """Its inputs, hence its logits and the loss, turn NaN at training batch ``bad`` (0-based, over the run)."""

    def __init__(self, bad: int) -> None:
        super().__init__(lr=0.1)
        self.bad, self.calls = bad, 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.calls == self.bad:
            x = x * float("nan")
        self.calls += 1
        return nn.functional.cross_entropy(self(x), y)


class LabelFree(TinyMLP):
    """A user loss that clamps the labels into range (so only MultiMix can notice they are out of range)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y.clamp(0, NUM_CLASSES - 1))


@pytest.fixture
def flag_reads(monkeypatch) -> list:
    """Records the global steps at which the flag is read (each read a host-device synchronisation)."""
    reads: list = []
    raise_if_unhealthy = HealthFlag.raise_if_unhealthy

    def recording(flag, loss_total, batch, global_step, head_path):
        if batch >= flag.healthy_before:  # a batch ran since the last read: this one reads the device
            reads.append(global_step)
        raise_if_unhealthy(flag, loss_total, batch, global_step, head_path)

    monkeypatch.setattr(HealthFlag, "raise_if_unhealthy", recording)
    return reads


def test_nan_loss_raises_at_once_when_read_every_step_naming_the_batch():
    model = NaNAt(bad=2)
    message = r"non-finite \(NaN or inf\) at training batch 2 \(noticed at global step 2\)"
    with pytest.raises(MultiMixError, match=message):
        trainer([MultiMix(n_tuples=5, check_every_n_steps=1)], max_steps=6, max_epochs=-1).fit(model, loader())
    assert model.calls == 3  # raised in the step of batch 2: nothing was trained on it
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_flag_reads_the_flag_every_n_steps_and_names_the_batches_since_the_last_read(flag_reads):
    model, callback = NaNAt(bad=2), MultiMix(n_tuples=5, probability=1.0, check_every_n_steps=4)
    with pytest.raises(MultiMixError, match=r"at a training batch from 1 to 4 \(noticed at global step 4\)"):
        trainer([callback], max_steps=8, max_epochs=-1).fit(model, loader(n=40))
    assert flag_reads == [0, 4]  # the first batch, then every 4: no read (no sync) at batches 1, 2, 3
    assert model.calls == 5


def test_flag_is_read_at_the_end_of_training(flag_reads):
    model, callback = NaNAt(bad=2), MultiMix(n_tuples=5, probability=1.0, check_every_n_steps=50)
    with pytest.raises(MultiMixError, match=r"at a training batch from 1 to 3 \(noticed at global step 4\)"):
        trainer([callback], max_steps=4, max_epochs=-1).fit(model, loader())
    assert flag_reads == [0, 4]  # the first batch, then at the end (after the 4th optimizer step)


def test_healthy_run_reads_without_raising(flag_reads):
    callback = MultiMix(n_tuples=5, check_every_n_steps=2)
    trainer([callback], max_steps=5, max_epochs=-1).fit(TinyMLP(), loader(n=20))
    assert flag_reads == [0, 2, 4]  # batches 0, 2 and 4 (the epoch's and the fit's last: read once)


@pytest.mark.parametrize("bad_label", [NUM_CLASSES, -1])
def test_labels_out_of_range_raise_naming_the_range_and_the_batch(bad_label):
    labels = torch.zeros(16, dtype=torch.long)
    labels[5] = bad_label  # batch 1 (batches of 4)
    model = LabelFree()
    with pytest.raises(MultiMixError, match=rf"labels outside \[0, {NUM_CLASSES}\) at a training batch from 1 to 3"):
        trainer([MultiMix(n_tuples=5, probability=1.0)], max_steps=4).fit(model, loader(labels=labels))


def test_a_label_out_of_range_on_an_input_mixup_batch_fails_in_the_cross_entropy():
    """Input mixup's terms are ``F.cross_entropy``'s, which rejects the label itself (no silent training)."""
    labels = torch.zeros(16, dtype=torch.long)
    labels[5] = NUM_CLASSES
    with pytest.raises(IndexError, match="out of bounds"):
        trainer([MultiMix(probability=0.0)], max_steps=4).fit(LabelFree(), loader(labels=labels))


def test_without_an_ignore_index_a_minus_100_label_on_an_input_mixup_batch_is_an_error():
    """``F.cross_entropy`` leaves -100 out by default; with ``ignore_index=None`` every label must be a class, so the
    health check counts it on input-mixup batches too (after the first batch, which is checked on its own)."""
    labels = torch.zeros(16, dtype=torch.long)
    labels[5] = -100  # batch 1 (batches of 4)
    with pytest.raises(MultiMixError, match=rf"labels outside \[0, {NUM_CLASSES}\) at a training batch from 1 to 3"):
        trainer([MultiMix(probability=0.0, ignore_index=None)], max_steps=4).fit(LabelFree(), loader(labels=labels))
    trainer([MultiMix(probability=0.0)], max_steps=4).fit(LabelFree(), loader(labels=labels))  # -100: ignored


def test_a_fit_on_cpu_emits_no_warning_from_the_package():
    """Reading the loss on the host must not trigger torch's "Converting a tensor with requires_grad=True to a
    scalar" warning (it did: ``float(loss)`` on the loss being optimised)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([MultiMix(n_tuples=8, seed=0)], max_steps=4).fit(TinyMLP(), loader(n=16, batch_size=4))
    ours = [str(w.message) for w in caught if "lightning_multimix" in w.filename]
    assert not ours, ours


def test_flag_is_read_at_each_epochs_end_before_the_loss_sum_restarts(flag_reads):
    model, callback = NaNAt(bad=2), MultiMix(n_tuples=5, probability=1.0, check_every_n_steps=50)
    with pytest.raises(MultiMixError, match=r"at a training batch from 1 to 3 \(noticed at global step 4\)"):
        trainer([callback], max_epochs=3).fit(model, loader())  # 4 batches an epoch
    assert flag_reads == [0, 4] and model.calls == 4  # the first batch, then the first epoch's end
