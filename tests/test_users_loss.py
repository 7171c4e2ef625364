"""The user's loss, the head and where mixing happens, as users write them: each case on a module like the
one a user writes, asserting on weights, buffers, logged values or the error's text."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn

from helpers import DIM, HIDDEN, NUM_CLASSES, RecordingMultiMix, TinyMLP, loader, tensors, trainer
from lightning_multimix import MultiMix, MultiMixError
from lightning_multimix.targets import explain_loss

F = nn.functional


def fit(model: L.LightningModule, callback: MultiMix, steps: int = 3, **kwargs) -> L.LightningModule:
    trainer([callback], max_steps=steps, **kwargs).fit(model, loader(n=16, batch_size=4))
    return model


# ---------------------------------------------------------------------------------------------------- the user's loss


class WithL2(TinyMLP):
    """Cross-entropy plus an L2 penalty on the head (not weight decay: a term of the loss)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.5 * self.fc.weight.pow(2).sum()


def test_an_l2_term_of_the_users_loss_keeps_training():
    """The head's weights move by the L2 term's gradient beside MultiMix's: with a zero learning rate for the body and
    the MultiMix loss made constant (uniform logits), only the penalty is left to move them."""
    torch.manual_seed(0)
    plain, with_l2 = TinyMLP(), WithL2()
    with_l2.load_state_dict(plain.state_dict())
    fit(plain, MultiMix(n_tuples=8, seed=1))
    fit(with_l2, MultiMix(n_tuples=8, seed=1))
    # the same mixing (same seed); the penalty 0.5 |W|^2 shrinks W by lr * W per step on top of it
    assert with_l2.fc.weight.norm() < plain.fc.weight.norm() * 0.85
    torch.testing.assert_close(with_l2.net[0].weight, plain.net[0].weight, rtol=0.2, atol=0.05)


def test_the_optimised_loss_is_multimix_plus_the_users_other_terms():
    """One step, read back: the loss Lightning optimises is the MultiMix loss of the same batch plus 0.5 |W|^2."""
    torch.manual_seed(0)
    returned = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            returned.append(outputs["loss"].detach())

    plain, with_l2 = TinyMLP(lr=0.0), WithL2(lr=0.0)
    with_l2.load_state_dict(plain.state_dict())
    trainer([MultiMix(n_tuples=8, seed=1), Spy()], max_steps=1).fit(plain, loader())
    trainer([MultiMix(n_tuples=8, seed=1), Spy()], max_steps=1).fit(with_l2, loader())
    torch.testing.assert_close(returned[1], returned[0] + 0.5 * with_l2.fc.weight.pow(2).sum().detach())


class MultiTask(L.LightningModule):
    """A classifier and a regression head on one encoder; the loss is cross-entropy plus the regression's MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh())
        self.fc = nn.Linear(HIDDEN, NUM_CLASSES)
        self.regressor = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.fc(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        return F.cross_entropy(self.fc(z), y) + F.mse_loss(self.regressor(z)[:, 0], x[:, 0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_auxiliary_regression_head_keeps_training():
    torch.manual_seed(0)
    model = MultiTask()
    before = copy.deepcopy(model.regressor.state_dict())
    fit(model, MultiMix(n_tuples=8, head="fc", seed=0))
    assert not torch.equal(model.regressor.weight, before["weight"])  # it never moved before


class ClassWeighted(TinyMLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, weight=torch.tensor([1.0, 5.0, 0.2]))


def test_class_weights_in_the_users_loss_are_an_error_that_says_what_happens():
    with pytest.raises(MultiMixError, match="cannot carry class weights"):
        fit(ClassWeighted(), MultiMix(n_tuples=8, head="fc", seed=0))


def test_label_smoothing_in_the_users_loss_is_carried_into_the_mixed_targets():
    """A loss with label smoothing 0.2 trains like MultiMix(label_smoothing=0.2) on a plain loss."""

    class Smoothed(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, label_smoothing=0.2)

    torch.manual_seed(0)
    plain, smoothed = TinyMLP(), Smoothed()
    smoothed.load_state_dict(plain.state_dict())
    fit(plain, MultiMix(n_tuples=8, label_smoothing=0.2, seed=3))
    fit(smoothed, MultiMix(n_tuples=8, seed=3))
    for a, b in zip(plain.parameters(), smoothed.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(MultiMixError, match="smooths its labels by 0.2"):
        fit(Smoothed(), MultiMix(n_tuples=8, label_smoothing=0.1, seed=3))


def test_explain_loss_against_written_out_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
    assert explain_loss(F.cross_entropy(logits, labels), logits, labels, -100).rest is False
    fit_ = explain_loss(F.cross_entropy(logits, labels, label_smoothing=0.3) + logits.sum().detach(), logits, labels,
                        -100)
    assert fit_.label_smoothing == pytest.approx(0.3) and fit_.rest
    assert explain_loss(F.cross_entropy(logits, labels, reduction="sum"), logits, labels, -100) is None
    assert explain_loss(F.cross_entropy(logits, (labels + 1) % 5), logits, labels, -100) is None
    assert explain_loss(logits.pow(2).mean(), logits, labels, -100) is None


# ---------------------------------------------------------------------------------------------------- the head


class HeadInStep(L.LightningModule):
    """forward returns the embeddings (after an 8-wide projection); training_step calls the classifier itself."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 8))
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.encoder(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.classifier(self(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_head_called_in_training_step_is_not_guessed_wrong():
    with pytest.raises(MultiMixError, match=r"found the head 'encoder.2'.*cross-entropy of 'classifier'.*"
                                            r"MultiMix\(head='classifier'\)"):
        fit(HeadInStep(), MultiMix(n_tuples=8, seed=0))
    model = fit(HeadInStep(), MultiMix(n_tuples=8, head="classifier", seed=0))  # the fix works
    assert model.classifier.weight.grad is not None


class AuxAfterClassifier(L.LightningModule):
    """forward returns the embeddings; training_step runs the classifier, then a projection for a regulariser: the
    last nn.Linear that ran is the projection."""

    def __init__(self, on_logits: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh())
        self.classifier = nn.Linear(HIDDEN, NUM_CLASSES)
        self.on_logits = on_logits
        self.proj = nn.Linear(NUM_CLASSES if on_logits else HIDDEN, 4)

    def forward(self, x):
        return self.encoder(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self(x)
        logits = self.classifier(z)
        return F.cross_entropy(logits, y) + 0.1 * self.proj(logits if self.on_logits else z).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_auxiliary_linear_after_the_classifier_is_not_taken_as_the_head():
    with pytest.raises(MultiMixError, match=r"found the head 'proj'.*MultiMix\(head='classifier'\)"):
        fit(AuxAfterClassifier(), MultiMix(n_tuples=8, seed=0))
    model = AuxAfterClassifier()
    before = model.proj.weight.detach().clone()
    fit(model, MultiMix(n_tuples=8, head="classifier", seed=0))
    assert not torch.equal(model.proj.weight, before)  # the regulariser keeps training


def test_a_regulariser_on_the_logits_is_an_error_that_names_it():
    with pytest.raises(MultiMixError, match="regulariser on the logits"):
        fit(AuxAfterClassifier(on_logits=True), MultiMix(n_tuples=8, head="classifier", seed=0))


class Cosine(L.LightningModule):
    """A cosine classifier: prototypes as a parameter, no nn.Linear for the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh())
        self.prototypes = nn.Parameter(torch.randn(NUM_CLASSES, HIDDEN))

    def forward(self, x):
        return 10 * F.linear(F.normalize(self.encoder(x)), F.normalize(self.prototypes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_cosine_classifier_is_an_error_that_says_to_wrap_it():
    with pytest.raises(MultiMixError, match=r"'encoder.0' \(4, 8\).*must be wrapped"):
        fit(Cosine(), MultiMix(n_tuples=8, seed=0))


class ArcHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(NUM_CLASSES, HIDDEN))

    def forward(self, z, labels):
        logits = F.linear(F.normalize(z), F.normalize(self.weight))
        return 10 * (logits - 0.2 * F.one_hot(labels, NUM_CLASSES))


class Margin(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.fc = ArcHead()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.fc(self.net(x), y), y)


def test_a_head_that_needs_the_labels_is_a_clear_error():
    with pytest.raises(MultiMixError, match="called with more than the embeddings"):
        fit(Margin(), MultiMix(n_tuples=8, head="fc", seed=0))


# ---------------------------------------------------------------------------------------------------- state


class BNHead(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(HIDDEN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def test_batch_norm_in_the_head_keeps_the_statistics_of_the_real_batch():
    """One step on MultiMix: the running statistics are the real batch's update, not a second one from the n
    interpolated embeddings."""
    torch.manual_seed(0)
    model = BNHead()
    reference = copy.deepcopy(model.fc[:2])
    x = tensors(16)[0][:4]  # the first batch of loader()
    with torch.no_grad():
        reference.train()(model.net(x))  # the real batch through the head's Linear and BatchNorm, once
    fit(model, MultiMix(n_tuples=32, probability=1.0, head="fc", seed=0), steps=1)
    torch.testing.assert_close(model.fc[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model.fc[1].running_var, reference[1].running_var)
    assert int(model.fc[1].num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------- where mixing happens


class ValidatesWithTrainingStep(TinyMLP):
    def validation_step(self, batch, batch_idx):
        loss = self.training_step(batch, batch_idx)
        self.log("val_loss", loss)


def test_a_validation_step_that_calls_training_step_is_not_mixed():
    callback, reference = MultiMix(n_tuples=8, seed=2), MultiMix(n_tuples=8, seed=2)
    model = ValidatesWithTrainingStep()
    torch.manual_seed(0)
    twin = copy.deepcopy(model)
    trainer([callback], max_steps=4, val_check_interval=2, num_sanity_val_steps=2).fit(
        model, loader(), val_dataloaders=loader(n=8))
    trainer([reference], max_steps=4).fit(twin, loader())
    assert callback.batch_counts == reference.batch_counts and sum(callback.batch_counts.values()) == 4
    for a, b in zip(model.parameters(), twin.parameters()):  # the random stream did not shift
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------- errors


def test_a_dict_without_loss_says_the_fix():
    class DictStep(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return {"total": F.cross_entropy(self(x), y)}

    with pytest.raises(MultiMixError, match=r"without a 'loss' key \(keys \['total'\]\).*\{'loss': loss"):
        fit(DictStep(), MultiMix(n_tuples=8, seed=0))


def test_the_users_own_ignore_index_is_read_from_the_loss(caplog):
    class IgnoresMinusOne(TinyMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, ignore_index=-1)

    labels = torch.tensor([0, 1, -1, 2] * 4)
    read, given = RecordingMultiMix(n_tuples=8, seed=0), RecordingMultiMix(n_tuples=8, seed=0, ignore_index=-1)
    for callback in (read, given):
        torch.manual_seed(0)
        trainer([callback], max_steps=2).fit(IgnoresMinusOne(), loader(labels=labels))
    assert "your loss ignores the label -1" in caplog.text
    assert all((w[2::4] == 0).all() for w in read.weights)  # the ignored examples are left out of the mixing
    torch.testing.assert_close(torch.stack(read.losses), torch.stack(given.losses))


def test_the_learning_rate_finder_tries_the_mixed_loss_and_leaves_the_stream_as_it_was():
    """The range test trains through the callback (the objective the fit optimises); afterwards the finder restores
    the weights and the callback's random stream, so the fit that follows is the fit without the finder."""
    from lightning.pytorch.tuner import Tuner

    torch.manual_seed(0)
    model, twin = TinyMLP(), TinyMLP()
    twin.load_state_dict(model.state_dict())
    tuned, plain = MultiMix(n_tuples=8, seed=4), MultiMix(n_tuples=8, seed=4)
    tuner_trainer = trainer([tuned], max_steps=3)
    Tuner(tuner_trainer).lr_find(model, train_dataloaders=loader(n=64), num_training=6, update_attr=False)
    assert sum(tuned.batch_counts.values()) == 6 and tuned.state_dict()["batches_seen"] == 0
    trainer([tuned], max_steps=3).fit(model, loader())
    trainer([plain], max_steps=3).fit(twin, loader())
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------- the teacher


class TwoCalls(L.LightningModule):
    """training_step calls the backbone, then the classifier block itself: forward is bypassed."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh())
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(HIDDEN, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.classifier(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_step_that_bypasses_forward_is_an_error_with_the_fix_under_distillation():
    from lightning_multimix import SelfDistillation

    with pytest.raises(MultiMixError, match=r"calls 'backbone' and then 'classifier' itself.*self\(\.\.\.\)"):
        fit(TwoCalls(), MultiMix(n_tuples=8, seed=0, distill=SelfDistillation()))


def test_validated_checkpoints_hold_the_teacher_and_resume_from_the_student(tmp_path):
    """With validate_with_teacher, the checkpoint's state_dict is the teacher (what was validated: a new callback's
    validate with ckpt_path scores it); a resumed fit goes on from the student, as the uninterrupted run."""
    from lightning_multimix import SelfDistillation

    options = dict(n_tuples=8, seed=0, distill=SelfDistillation(ema_decay=0.5, validate_with_teacher=True))
    torch.manual_seed(0)
    model = TinyMLP()
    start = copy.deepcopy(model.state_dict())
    callback = MultiMix(**options)
    first = trainer([callback], max_steps=2)
    first.fit(model, loader(n=8))  # two batches: the checkpoint ends an epoch, where a resumed fit starts
    path = tmp_path / "two.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    for name, value in callback.teacher.module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    scored = ValidatesWithTrainingStep()
    trainer([MultiMix(**options)]).validate(scored, loader(), ckpt_path=path, verbose=False)
    for name, value in callback.teacher.module.state_dict().items():
        assert torch.equal(scored.state_dict()[name], value), name

    resumed, full = TinyMLP(), TinyMLP()
    full.load_state_dict(start)
    trainer([MultiMix(**options)], max_steps=4).fit(resumed, loader(n=8), ckpt_path=path)
    trainer([MultiMix(**options)], max_steps=4).fit(full, loader(n=8))
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_copy_of_a_fitted_module_and_callback_keeps_its_own_teacher():
    from lightning_multimix import SelfDistillation

    model, callback = TinyMLP(), MultiMix(n_tuples=8, seed=0, distill=SelfDistillation())
    fit(model, callback, steps=3)
    model_copy, callback_copy = copy.deepcopy((model, callback))
    fit(model_copy, callback_copy, steps=2)
    assert callback_copy.teacher.num_updates == 5  # continued, not rebuilt from the student
    assert callback.teacher.num_updates == 3


def test_a_restored_teacher_is_validated_without_a_fit_first():
    """The state a spawned fit sends back (or load_state_dict) holds the teacher before any fit builds it: validating
    with the teacher swaps it in all the same."""
    from lightning_multimix import SelfDistillation

    options = dict(n_tuples=8, seed=0, distill=SelfDistillation(ema_decay=0.5, validate_with_teacher=True))
    model, callback = ValidatesWithTrainingStep(), MultiMix(**options)
    fit(model, callback, steps=2)
    seen = []

    class Seen(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append(pl_module.fc.weight.detach().clone())

    restored = MultiMix(**options)
    restored.load_state_dict(callback.state_dict())
    student = model.fc.weight.detach().clone()
    trainer([restored, Seen()]).validate(model, loader(n=4), verbose=False)
    assert torch.equal(seen[0], callback.teacher.module.fc.weight) and not torch.equal(seen[0], student)
    assert torch.equal(model.fc.weight, student)  # swapped back


def test_dense_mode_does_not_take_a_block_with_batch_norm_as_the_head():
    from lightning_multimix.head import classifier_block

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net.plain = nn.Sequential(nn.Dropout(), nn.Linear(4, 2))
    assert classifier_block(net, "classifier.3") == "classifier.3"  # the block has statistics: the Linear alone
    assert classifier_block(net, "plain.1") == "plain"


class HeadCalledInStep(TinyMLP):
    """training_step runs the encoder, then the top-level head itself (forward is not called)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.fc(self.net(x)), y)


def test_a_top_level_head_called_in_the_step_under_distillation_says_what_to_do():
    from lightning_multimix import SelfDistillation

    with pytest.raises(MultiMixError, match=r"called no module on the way to the head 'fc'.*self\(\.\.\.\)"):
        fit(HeadCalledInStep(), MultiMix(n_tuples=8, head="fc", seed=0, distill=SelfDistillation()))


def test_the_batch_size_finder_tries_the_mixed_loss_and_leaves_the_stream_as_it_was():
    from lightning.pytorch.callbacks import BatchSizeFinder

    class Sized(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 4

        def train_dataloader(self):
            return loader(n=64, batch_size=self.batch_size)

    callback = MultiMix(n_tuples=8, seed=4)
    finder = BatchSizeFinder(mode="power", steps_per_trial=2, init_val=4, max_trials=2)
    trainer([finder, callback], max_steps=1).fit(Sized())
    assert sum(callback.batch_counts.values()) == 2 * 2 + 1  # two trials of two steps went through it, then one
    assert callback.state_dict()["batches_seen"] == 1  # the trials' batches were given back


def test_only_rank_0_of_spawned_processes_sends_the_state_back():
    """The state goes back among Lightning's results from rank 0 of a spawned fit only; elsewhere the process that
    trained is the main one (or another rank's copy is not the one that comes back)."""
    import types

    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from lightning_multimix import spawn

    launcher = _MultiProcessingLauncher.__new__(_MultiProcessingLauncher)
    for rank, sent in ((1, False), (0, True)):
        fake = types.SimpleNamespace(strategy=types.SimpleNamespace(launcher=launcher), local_rank=rank,
                                     callback_metrics={})
        assert spawn.send_to_main_process(fake, "token", {"batches_seen": 3}) is sent
        assert (spawn.KEY in fake.callback_metrics) is sent
    not_spawned = types.SimpleNamespace(strategy=types.SimpleNamespace(launcher=None), local_rank=0,
                                        callback_metrics={})
    assert spawn.send_to_main_process(not_spawned, "token", {"batches_seen": 3}) is False
    assert not_spawned.callback_metrics == {}
