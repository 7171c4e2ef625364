"""No silent wrong training, no lost state: one regression test per failure a user's module showed.

Each test is built on a module like the one that showed the failure: a classifier registered before its body, an
auxiliary head, ``(x, mask, y)`` batches, an exception in validation with the teacher swapped in, a deep copy during
training, a last batch of one, ignored labels (-100), a NaN first batch in dense mode, sharded strategies.
"""

from __future__ import annotations

import copy
import logging
import pickle
import signal
import types
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_multimix.batch as batch_module
from helpers import DIM, NUM_CLASSES, TinyCNN, TinyMLP, loader, tensors, trainer
from lightning_multimix import Dense, MultiMix, MultiMixError, MultiMixMixin, SelfDistillation


class Returned(L.Callback):
    """The loss each training step handed to the optimizer."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


class FixedWeights(MultiMix):
    """MultiMix on every batch with known weights."""

    def __init__(self, weights: Tensor, **kwargs: Any) -> None:
        super().__init__(n_tuples=weights.shape[1], probability=1.0, **kwargs)
        self.fixed = weights

    def sample_weights(self, num_examples, mode, generator, keep=None):
        weights = self.fixed.to(generator.device)
        if keep is None:
            return weights
        kept = weights * keep.unsqueeze(1)  # the contract: left-out examples get weight 0
        return kept / kept.sum(0, keepdim=True)


def hand_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    targets = torch.eye(logits.shape[1])[labels.clamp_min(0)] * (labels >= 0).float().unsqueeze(1)
    return -((weights.T @ targets) * (weights.T @ logits).log_softmax(-1)).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------- 1. the head


class ClassifierFirst(L.LightningModule):
    """Registers its classifier before its body: the last registered nn.Linear is in the body."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, NUM_CLASSES)
        self.body = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh())

    def forward(self, x):
        return self.classifier(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_head_is_the_linear_whose_output_forward_returns_not_the_last_registered():
    torch.manual_seed(0)
    model, returned = ClassifierFirst(), Returned()
    initial = copy.deepcopy(model)
    weights = torch.distributions.Dirichlet(torch.ones(4)).sample((6,)).T
    callback = FixedWeights(weights)
    trainer([callback, returned], max_steps=1).fit(model, loader(n=4, batch_size=4))
    assert callback.head_path == "classifier"
    x, y = tensors(4)
    torch.testing.assert_close(returned.losses[0], hand_loss(initial(x), y, weights).detach())
    assert not torch.equal(model.classifier.weight, initial.classifier.weight)  # the real classifier trained


class AuxAfter(ClassifierFirst):
    """An auxiliary nn.Linear registered after the classifier, used in the loss but not returned by forward."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) + 0.1 * self.aux(self.body(x)).pow(2).mean()


def test_an_auxiliary_linear_registered_after_the_classifier_is_not_taken():
    callback = MultiMix(n_tuples=8, seed=0)
    trainer([callback], max_steps=2).fit(AuxAfter(), loader(n=8, batch_size=4))
    assert callback.head_path == "classifier"


class ReturnsBoth(AuxAfter):
    def forward(self, x):
        z = self.body(x)
        return self.classifier(z), self.aux(z)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits, aux = self(x)
        return nn.functional.cross_entropy(logits, y) + aux.pow(2).mean()


def test_two_linear_outputs_returned_together_are_ambiguous_and_stop_before_any_update():
    model = ReturnsBoth()
    initial = copy.deepcopy(model)
    with pytest.raises(MultiMixError, match=r"cannot tell the classifier head.*\['classifier', 'aux'\].*head="):
        trainer([MultiMix(n_tuples=8)], max_steps=2).fit(model, loader(n=8, batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters()))


@dataclass
class Output:
    """A model-output object (as Hugging Face returns): ``loss`` and ``logits``."""

    loss: Tensor
    logits: Tensor


class ReturnsOutputObject(ClassifierFirst):
    def forward(self, x, y):
        logits = self.classifier(self.body(x))
        return Output(nn.functional.cross_entropy(logits, y), logits)

    def training_step(self, batch, batch_idx):
        return self(*batch).loss


class ReturnsLogSoftmax(ClassifierFirst):
    def forward(self, x):
        return self.classifier(self.body(x)).log_softmax(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.nll_loss(self(x), y)


class CallsItsNetwork(L.LightningModule):
    """Its training step calls a submodule directly, not its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("module, head, how", [
    (ReturnsOutputObject, "classifier", "whose output the model returns"),
    (ReturnsLogSoftmax, "classifier", "the last nn.Linear that ran"),
    (CallsItsNetwork, "net.4", "whose output the model returns"),
])
def test_head_found_from_what_runs(module, head, how, caplog):
    callback = MultiMix(n_tuples=8, seed=0)
    with caplog.at_level(logging.INFO):
        trainer([callback], max_steps=2).fit(module(), loader(n=8, batch_size=4))
    assert callback.head_path == head
    assert any(f"head {head!r} (" in record.getMessage() and how in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------------- 2. the labels


class WithMask(TinyMLP):
    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        return nn.functional.cross_entropy(self(x * mask), y)


def mask_loader() -> DataLoader:
    x, y = tensors(8)
    return DataLoader(TensorDataset(x, torch.ones(8, DIM), y), batch_size=4)


def test_three_tensor_batches_need_the_labels_named():
    with pytest.raises(MultiMixError, match=r"3 elements.*multimix_labels\(batch\)"):
        trainer([MultiMix(n_tuples=8)], max_steps=1).fit(WithMask(), mask_loader())

    class Named(MultiMixMixin, WithMask):
        def multimix_labels(self, batch):
            return batch[2]

    callback = MultiMix(n_tuples=8)
    trainer([callback], max_steps=2).fit(Named(), mask_loader())
    assert sum(callback.batch_counts.values()) == 2


class WrongLabelKey(TinyMLP):
    """Its dict batches carry a 'label' key that is not what its loss uses (the class is under 'class_id')."""

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["class_id"])


def dict_loader() -> DataLoader:
    x, y = tensors(8)
    rows = [{"x": x[i], "class_id": y[i], "label": (y[i] + 1) % NUM_CLASSES} for i in range(8)]
    return DataLoader(rows, batch_size=4)


def test_labels_that_disagree_with_the_users_loss_stop_training_with_the_fix():
    """Training on other labels than the user's loss uses would train the wrong thing: an error, not a warning."""
    with pytest.raises(MultiMixError, match=r"not the cross-entropy of its logits.*multimix_labels\(batch\)"):
        trainer([MultiMix(n_tuples=8, seed=0)], max_steps=1).fit(WrongLabelKey(), dict_loader())


def test_agreeing_labels_raise_no_warning(recwarn):
    trainer([MultiMix(n_tuples=8, seed=0)], max_steps=2).fit(TinyMLP(), loader(n=8, batch_size=4))
    assert not [w for w in recwarn if "not the cross-entropy" in str(w.message)]


# ---------------------------------------------------------------------------------------------------- 3. the teacher


class FailsInValidation(TinyMLP):
    def __init__(self, error: type) -> None:
        super().__init__()
        self.error = error

    def validation_step(self, batch, batch_idx):
        self(batch[0])
        raise self.error("validation broke")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_in_validation_puts_the_students_weights_back(error):
    torch.manual_seed(0)
    model = FailsInValidation(error)
    callback = MultiMix(n_tuples=8, seed=0, distill=SelfDistillation(ema_decay=0.5, ema_warmup=False,
                                                                    validate_with_teacher=True))
    students: list = []

    class Keep(L.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):  # after MultiMix swapped the teacher in
            students.append({k: v.clone() for k, v in callback.teacher.module.state_dict().items()})

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if error is KeyboardInterrupt else RuntimeError):
            trainer([callback, Keep()], max_steps=3, val_check_interval=3, num_sanity_val_steps=0).fit(
                model, loader(n=16, batch_size=4), loader(n=4))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    assert not callback.distiller.swapped
    for key, value in model.state_dict().items():  # the student's weights (held by the teacher while swapped)
        assert torch.equal(value, students[0][key]), key
    assert not torch.equal(model.fc.weight, callback.teacher.module.fc.weight)


# ---------------------------------------------------------------------------------------------------- 4. deep copies


class CopiesItself(TinyMLP):
    """Deep-copies itself inside its training step (a hand-made EMA does) and runs the copy."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.copied = copy.deepcopy(self)
        self.copied(x)  # the copy's forward must not count as a call of the head
        return nn.functional.cross_entropy(self(x), y)


def test_deep_copies_during_and_after_training_work_and_carry_no_machinery():
    model = CopiesItself()
    pickled: list = []

    class Pickles(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pickled.append(pickle.loads(pickle.dumps(pl_module)))

    callback = MultiMix(n_tuples=8, seed=0)
    trainer([callback, Pickles()], max_steps=3).fit(model, loader(n=12, batch_size=4))
    assert sum(callback.batch_counts.values()) == 3
    for clone in (model.copied, pickled[-1], copy.deepcopy(model)):
        assert "training_step" not in clone.__dict__ or clone.training_step.__self__ is clone
        x, y = tensors(4)
        torch.testing.assert_close(clone.training_step((x, y), 0), nn.functional.cross_entropy(clone(x), y))


# ---------------------------------------------------------------------------------------------------- 7. ignored labels


def test_labels_equal_to_the_ignore_index_are_left_out_of_the_mixing(caplog):
    torch.manual_seed(0)
    labels = torch.tensor([0, -100, 2, 1])
    model, returned = TinyMLP(lr=0.0), Returned()
    weights = torch.distributions.Dirichlet(torch.ones(4)).sample((5,)).T

    class UserIgnores(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)  # ignore_index=-100 by default

    model = UserIgnores(lr=0.0)
    with caplog.at_level(logging.INFO):
        trainer([FixedWeights(weights), returned], max_steps=1).fit(model, loader(n=4, labels=labels))
    kept = weights * torch.tensor([1.0, 0.0, 1.0, 1.0]).unsqueeze(1)
    kept = kept / kept.sum(0, keepdim=True)
    x, _ = tensors(4)
    torch.testing.assert_close(returned.losses[0], hand_loss(model(x), labels, kept).detach())


def test_ignored_labels_on_an_input_mixup_batch(monkeypatch):
    partner = [2, 0, 3, 1]
    monkeypatch.setattr(batch_module, "mixup_pairing",
                        lambda n, alpha=1.0, *, generator=None, device=None, dtype=torch.float32:
                        (torch.tensor(0.3), torch.tensor(partner)))
    labels = torch.tensor([0, -100, 2, 1])
    model, returned = TinyMLP(lr=0.0), Returned()
    trainer([MultiMix(probability=0.0), returned], max_steps=1).fit(model, loader(n=4, labels=labels))
    x, _ = tensors(4)
    log_p = model(0.3 * x + 0.7 * x[partner]).log_softmax(-1)
    # each label term averages over its own labels that are not ignored, as F.cross_entropy: [0, -, 2, 1] and, of the
    # partners, [2, 0, 1, -]
    own = -(log_p[0, 0] + log_p[2, 2] + log_p[3, 1]) / 3
    partners = -(log_p[0, 2] + log_p[1, 0] + log_p[2, 1]) / 3
    torch.testing.assert_close(returned.losses[0], (0.3 * own + 0.7 * partners).detach())


def test_ignore_index_none_makes_negative_labels_an_error():
    with pytest.raises(MultiMixError, match=r"labels outside \[0, 3\)"):
        trainer([MultiMix(n_tuples=8, ignore_index=None)], max_steps=1).fit(
            TinyMLP(), loader(n=4, labels=torch.tensor([0, -100, 2, 1])))
    with pytest.raises(MultiMixError, match=r"ignore_index=2\) is one of the 3 classes"):  # a class: not ignorable
        trainer([MultiMix(n_tuples=8, ignore_index=2)], max_steps=1).fit(TinyMLP(), loader(n=4))


# ---------------------------------------------------------------------------------------------------- 8. dense, NaN


def test_dense_nan_first_batch_says_nan_not_a_mismatch():
    x, y = tensors(4, image=True)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(MultiMixError, match="first training batch holds NaN or inf"):
        trainer([MultiMix(n_tuples=8, dense=Dense())], max_steps=1).fit(TinyCNN(), DataLoader(TensorDataset(x, y), 4))


# ---------------------------------------------------------------------------------------------------- 9. strategies


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused_up_front(strategy):
    fake_trainer = types.SimpleNamespace(strategy=strategy(), world_size=1)
    with pytest.raises(MultiMixError, match=f"got {strategy.__name__}.*DDP strategy"):
        MultiMix().setup(fake_trainer, TinyMLP(), "fit")


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "XLAStrategy", "FSDPStrategy", "ModelParallelStrategy"])
def test_strategies_that_shard_or_replace_parameters_are_refused(name):
    """Lightning's own classes (DeepSpeed and XLA subclass DDPStrategy), made without their optional dependencies."""
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, name)
    with pytest.raises(MultiMixError, match=f"got {name}"):
        MultiMix().setup(types.SimpleNamespace(strategy=cls.__new__(cls), world_size=1), TinyMLP(), "fit")


def test_labels_named_by_the_mixin_are_not_second_guessed(recwarn):
    """A user who names the labels and adds label smoothing to their loss gets no warning (the check is for labels
    MultiMix had to guess), also when the head is found on the first batch."""

    class Smoothed(MultiMixMixin, TinyMLP):
        def multimix_labels(self, batch):
            return batch[1]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y, label_smoothing=0.2)

    trainer([MultiMix(n_tuples=8, seed=0)], max_steps=2).fit(Smoothed(), loader(n=8, batch_size=4))
    assert not [w for w in recwarn if "not the cross-entropy" in str(w.message)]
