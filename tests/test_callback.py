"""The MultiMix callback on real Trainers and tiny models: the loss it trains on, adoption, errors."""

import copy
import pickle
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import trainer
from lightning_multimix import MultiMix, MultiMixError, MultiMixMixin
from lightning_multimix.step import TrainingStep

NUM_CLASSES, DIM = 3, 8


class MLP(L.LightningModule):
    """A user's module: forward, ordinary cross-entropy training_step, nothing MultiMix-specific."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh())
        self.head = nn.Linear(16, NUM_CLASSES)
        self.lr = lr
        self.user_losses: list = []

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.user_losses.append(loss.detach().clone())
        self.log("user_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 32, batch_size: int = 8, seed: int = 0, labels=None) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g) if labels is None else labels
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class FixedWeights(MultiMix):
    """MultiMix with a known weight matrix, recording the loss it returns at every step."""

    def __init__(self, weights: torch.Tensor, **kwargs: Any) -> None:
        kwargs.setdefault("probability", 1.0)
        super().__init__(n_tuples=weights.shape[1], **kwargs)
        self.fixed = weights
        self.losses: list = []

    def sample_weights(self, num_examples, mode, generator, keep=None):
        return self.fixed.to(generator.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if outputs:  # None where the user skipped the batch
            self.losses.append(outputs["loss"].detach().clone())


def test_loss_is_the_multimix_loss_computed_independently():
    torch.manual_seed(0)
    model = MLP(lr=0.0)  # parameters stay put, so the expectation can be computed after fit
    weights = torch.tensor([[0.1, 0.5, 0.0], [0.2, 0.5, 0.0], [0.3, 0.0, 0.0], [0.4, 0.0, 1.0]])
    callback = FixedWeights(weights)
    loader = data(n=8, batch_size=4)
    trainer(callbacks=[callback]).fit(model, loader)

    x, y = next(iter(loader))
    with torch.no_grad():
        z = model.body(x)
        mixed_z = weights.T @ z  # independent: mix embeddings, then run the head
        mixed_logits = mixed_z @ model.head.weight.T + model.head.bias
        mixed_targets = weights.T @ torch.eye(NUM_CLASSES)[y]
        expected = -(mixed_targets * mixed_logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(callback.losses[0], expected)
    assert not torch.allclose(callback.losses[0], model.user_losses[0])


def test_training_follows_the_multimix_gradient():
    """One SGD step with the callback equals one SGD step on the independently computed MultiMix loss."""
    torch.manual_seed(0)
    model = MLP(lr=0.5)
    reference = copy.deepcopy(model)
    weights = torch.distributions.Dirichlet(torch.ones(4)).sample((10,)).T
    loader = data(n=4, batch_size=4)
    trainer(callbacks=[FixedWeights(weights)]).fit(model, loader)

    x, y = next(iter(loader))
    z = reference.body(x)
    logits = reference.head(weights.T @ z)
    targets = weights.T @ torch.eye(NUM_CLASSES)[y]
    loss = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=f"parameter {name} differs")
    # the encoder moved: gradients reached it
    assert not torch.allclose(model.body[0].weight, MLP().body[0].weight)


@pytest.mark.parametrize("logit_space", ["always", "never"])
def test_both_paths_train_to_the_same_weights(logit_space):
    results = []
    for space in (logit_space, "never" if logit_space == "always" else "always"):
        torch.manual_seed(0)
        model = MLP()
        trainer(callbacks=[MultiMix(n_tuples=50, seed=3, logit_space=space)], max_epochs=2).fit(model, data())
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_own_loss_batches_leave_the_users_training_exactly(monkeypatch):
    monkeypatch.setattr(TrainingStep, "kind", lambda self, index, rank: "own_loss")
    finals = []
    for callbacks in ([], [MultiMix(other_batches="own_loss")]):
        torch.manual_seed(0)
        model = MLP()
        trainer(callbacks=callbacks, max_epochs=2).fit(model, data())
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_clean_loss_weight_adds_the_users_loss():
    torch.manual_seed(0)
    weights = torch.full((4, 2), 0.25)
    plain, clean = FixedWeights(weights), FixedWeights(weights, clean_loss_weight=0.5)
    model = MLP(lr=0.0)
    for callback in (plain, clean):
        trainer(callbacks=[callback]).fit(model, data(n=4, batch_size=4))
    # the trained value is the MultiMix loss plus 0.5 * the user's cross-entropy
    assert len(model.user_losses) == 2 and torch.equal(model.user_losses[0], model.user_losses[1])
    torch.testing.assert_close(clean.losses[0], plain.losses[0] + 0.5 * model.user_losses[-1])
    assert not torch.allclose(clean.losses[0], plain.losses[0])


def test_logs_multimix_loss_and_keeps_user_logs_and_validation():
    torch.manual_seed(0)
    model = MLP()
    t = trainer(callbacks=[MultiMix(n_tuples=20, seed=0)], limit_val_batches=2)
    t.fit(model, data(), data(seed=1))
    assert {"multimix/loss", "multimix/loss_epoch", "user_loss", "val_loss"} <= set(t.callback_metrics)
    # validation is untouched: it is the plain cross-entropy of the model
    loader = data(seed=1)
    expected = torch.stack([nn.functional.cross_entropy(model(x), y) for x, y in list(loader)[:2]]).mean()
    torch.testing.assert_close(t.callback_metrics["val_loss"], expected.detach())


def test_module_is_left_unchanged_and_picklable_after_fit():
    model = MLP()
    trainer(callbacks=[MultiMix(n_tuples=10)]).fit(model, data())
    assert "training_step" not in model.__dict__
    assert not model.head._forward_hooks and not model._forward_hooks
    pickle.loads(pickle.dumps(model))


def test_pairs_mode_trains_with_pair_weights():
    seen = []

    class Spy(MultiMix):
        def sample_weights(self, num_examples, mode, generator, keep=None):
            w = super().sample_weights(num_examples, mode, generator, keep)
            seen.append(w)
            return w

    trainer(callbacks=[Spy(mode="pairs", seed=0, probability=1.0)]).fit(MLP(), data())
    assert len(seen) == 4
    for w in seen:
        assert w.shape == (8, 8)
        assert ((w > 0).sum(0) <= 2).all()
        torch.testing.assert_close(w.sum(0), torch.ones(8))


def test_same_seed_same_run_and_resumable_stream():
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model = MLP()
        trainer(callbacks=[MultiMix(n_tuples=30, seed=7)]).fit(model, data())
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1])
    state = MultiMix(seed=7).state_dict()
    assert set(state) >= {"base_seed", "batches_seen"}


def test_state_dict_round_trip():
    callback = MultiMix(n_tuples=10, seed=5)
    trainer(callbacks=[callback]).fit(MLP(), data())
    state = callback.state_dict()
    assert state["base_seed"] == 5 and state["batches_seen"] == 4
    restored = MultiMix(n_tuples=10)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


# ---------------------------------------------------------------- the mixin


class AuxNet(MultiMixMixin, L.LightningModule):
    """The classifier is not the last Linear, and labels live under a custom key: the mixin says so."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU())
        self.classifier = nn.Linear(16, NUM_CLASSES)
        self.aux = nn.Linear(16, 1)  # registered last: auto-detection would pick it

    def multimix_head(self):
        return self.classifier

    def multimix_labels(self, batch):
        return batch["class_id"]

    def forward(self, x):
        z = self.body(x)
        return self.classifier(z), self.aux(z)

    def training_step(self, batch, batch_idx):
        logits, aux = self(batch["x"])
        return nn.functional.cross_entropy(logits, batch["class_id"]) + aux.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictData(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x, self.y = torch.randn(n, DIM), torch.randint(0, NUM_CLASSES, (n,))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "class_id": self.y[i]}


def test_mixin_declares_head_and_labels():
    callback = MultiMix(n_tuples=10)
    t = trainer(callbacks=[callback])
    t.fit(AuxNet(), DataLoader(DictData(), batch_size=4))
    assert callback.head_path == "classifier"
    assert torch.isfinite(t.callback_metrics["multimix/loss_epoch"])


def test_without_the_mixin_the_aux_head_is_rejected():
    class NoMixin(AuxNet):
        def multimix_head(self):
            return None

    with pytest.raises(MultiMixError, match="aux.*head="):
        trainer(callbacks=[MultiMix()]).fit(NoMixin(), DataLoader(DictData(), batch_size=4))


def test_head_argument_names_the_head():
    class NoMixin(AuxNet):
        def multimix_head(self):
            return None

    callback = MultiMix(n_tuples=10, head="classifier")
    trainer(callbacks=[callback]).fit(NoMixin(), DataLoader(DictData(), batch_size=4))
    assert callback.head_path == "classifier"


@pytest.mark.parametrize("key", ["label", "labels", "target", "y"])
def test_default_dict_label_keys(key):
    class KeyData(DictData):
        def __getitem__(self, i):
            return {"x": self.x[i], key: self.y[i]}

    class Net(MLP):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["x"]), batch[key])

    t = trainer(callbacks=[MultiMix(n_tuples=10)])
    t.fit(Net(), DataLoader(KeyData(), batch_size=4))
    assert "multimix/loss_epoch" in t.callback_metrics


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_tuples=0), "n_tuples=0"),
        (dict(n_tuples=2.5), "n_tuples=2.5"),
        (dict(alpha=0.0), "alpha=0.0"),
        (dict(alpha=-1.0), "alpha=-1.0"),
        (dict(probability=1.5), "probability=1.5"),
        (dict(probability=-0.1), "probability=-0.1"),
        (dict(mode="cutmix"), "mode='cutmix'"),
        (dict(tuple_size=1), "tuple_size=1"),
        (dict(label_smoothing=1.0), "label_smoothing=1.0"),
        (dict(clean_loss_weight=-1.0), "clean_loss_weight=-1.0"),
        (dict(logit_space="maybe"), "logit_space='maybe'"),
        (dict(mode="pairs", tuple_size=4), "tuple_size"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiMix(**kwargs)


def test_no_head_found():
    class NoLinear(MLP):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(1, 3, 8), nn.Flatten())
            del self.head

        def forward(self, x):
            return self.body(x.unsqueeze(1))

    with pytest.raises(MultiMixError, match="no classifier head.*head="):
        trainer(callbacks=[MultiMix()]).fit(NoLinear(), data())


def test_wrong_head_path():
    with pytest.raises(MultiMixError, match="No submodule 'fc'.*\\['body.0', 'head'\\]"):
        trainer(callbacks=[MultiMix(head="fc")]).fit(MLP(), data())


def test_labels_missing():
    loader = DataLoader(TensorDataset(torch.randn(8, DIM)), batch_size=4)

    class Net(MLP):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

    with pytest.raises(MultiMixError, match="cannot find labels.*multimix_labels"):
        trainer(callbacks=[MultiMix()]).fit(Net(), loader)


@pytest.mark.parametrize("labels, match", [
    (torch.rand(8), r"\(b,\) integer class labels, \(b, c\) floating targets.*float32 and shape \(4,\)"),
    (torch.randint(0, NUM_CLASSES, (8, 5)), r"labels per position of shape \(4, 5\).*Those of such shapes: none"),
])
def test_labels_neither_class_indices_nor_targets_are_refused(labels, match):
    """Float (b,) values (regression) are no targets; integer (b, T) labels are per position, and a model without
    (b, T, c) or (b, c, T) logits has none to mix: errors, not guesses."""
    class Net(MLP):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

    loader = DataLoader(TensorDataset(torch.randn(8, DIM), labels), batch_size=4)
    with pytest.raises(MultiMixError, match=match):
        trainer(callbacks=[MultiMix()]).fit(Net(), loader)


def test_labels_out_of_range():
    class Net(MLP):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

    with pytest.raises(MultiMixError, match=r"labels outside \[0, 3\)"):
        trainer(callbacks=[MultiMix()]).fit(Net(), data(n=8, labels=torch.tensor([0, 1, 2, 0, 1, 2, 5, 0])))


def test_a_last_batch_of_one_trains_on_the_users_loss_with_one_warning():
    returned = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            returned.append(outputs["loss"].detach())

    callback = MultiMix(n_tuples=10, seed=0)
    model = MLP()
    with pytest.warns(UserWarning, match="batch of 1 example.*drop_last=True") as record:
        trainer(callbacks=[callback, Spy()], max_epochs=2).fit(model, data(n=9, batch_size=4))
    assert sum("batch of 1" in str(w.message) for w in record) == 1  # once, not once per epoch
    assert callback.batch_counts["own_loss"] == 2 and sum(callback.batch_counts.values()) == 6
    # the batch of one (the 3rd and 6th step) trained on exactly the user's loss
    torch.testing.assert_close(returned[2], model.user_losses[2])
    torch.testing.assert_close(returned[5], model.user_losses[5])


def test_head_output_not_b_by_c():
    class Tokens(MLP):
        """The last Linear runs on (b, r, d) tokens: it is not a classifier head on embeddings."""

        def forward(self, x):
            return self.head(self.body(x).unsqueeze(1).expand(-1, 4, -1)).mean(1)

    with pytest.raises(MultiMixError, match=r"maps \(8, 4, 16\) to \(8, 4, 3\).*head="):
        trainer(callbacks=[MultiMix()]).fit(Tokens(), data())


def test_head_called_twice():
    class Twice(MLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y) + nn.functional.cross_entropy(self(x + 1), y)

    with pytest.raises(MultiMixError, match="exactly once.*ran 2 times"):
        trainer(callbacks=[MultiMix()]).fit(Twice(), data())


def test_manual_optimization_is_rejected():
    class Manual(MLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MultiMixError, match="automatic optimization"):
        trainer(callbacks=[MultiMix()]).fit(Manual(), data())


def test_training_step_returning_a_dict_and_skipping_batches():
    class Net(MLP):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                return None
            x, y = batch
            return {"loss": nn.functional.cross_entropy(self(x), y), "extra": 1}

    callback = FixedWeights(torch.full((8, 3), 1 / 8))
    trainer(callbacks=[callback]).fit(Net(), data())
    assert len(callback.losses) == 3  # batch 1 was skipped by the user and left alone


def test_the_optimised_loss_is_logged_as_window_means_off_the_progress_bar():
    """MultiMix logs the mean since the last log at the first batch, every ``log_every_n_steps`` batches and at the
    epoch's last batch, and the epoch mean once at its end; not on the progress bar (Lightning reads progress-bar
    values on the host at every step)."""
    returned, logged = [], []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            returned.append(outputs["loss"].detach())
            logged.append(trainer.callback_metrics.get("multimix/loss"))
            assert "multimix/loss" not in trainer.progress_bar_metrics

    t = trainer(callbacks=[MultiMix(n_tuples=16, seed=0), Spy()], log_every_n_steps=3)
    t.fit(MLP(), data(n=64, batch_size=8))  # 8 batches: logged at batches 1, 3, 6 and 8
    losses = torch.stack(returned)
    expected = {0: losses[0], 2: losses[1:3].mean(), 5: losses[3:6].mean(), 7: losses[6:8].mean()}
    for index, value in enumerate(logged):
        last = max(i for i in expected if i <= index)
        torch.testing.assert_close(torch.as_tensor(value), expected[last].float())
    torch.testing.assert_close(t.callback_metrics["multimix/loss_epoch"], losses.mean())


def test_the_loss_reaches_the_loggers_whenever_lightning_logs():
    """Epochs of 5 batches, ``log_every_n_steps=3``: Lightning logs at global batches 3, 6, 9 (1-based), across
    epoch boundaries; every one of those logs carries ``multimix/loss``."""
    from lightning.pytorch.loggers import Logger

    class Memory(Logger):
        name, version = "memory", 0

        def __init__(self):
            super().__init__()
            self.steps = []

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.steps.append((step, set(metrics)))

    memory = Memory()
    t = trainer(callbacks=[MultiMix(n_tuples=8, seed=0)], log_every_n_steps=3, max_epochs=2, logger=memory)
    t.fit(MLP(), data(n=40, batch_size=8))
    step_logs = [(step, keys) for step, keys in memory.steps if "multimix/loss_epoch" not in keys]
    assert [step for step, _ in step_logs] == [2, 5, 8]
    assert all("multimix/loss" in keys for _, keys in step_logs)
    assert sum("multimix/loss_epoch" in keys for _, keys in memory.steps) == 2


def test_the_head_input_is_copied_only_when_the_head_could_overwrite_it():
    """An nn.Linear head's input is captured as is (nothing inside it writes in place); a head with an in-place
    layer before its Linear (EfficientNet's classifier) is captured as a copy that keeps the values it was given."""
    from lightning_multimix.capture import StepCapture
    from lightning_multimix.head import head_tensors

    x = torch.randn(4, DIM)
    linear = nn.Sequential(nn.Linear(DIM, NUM_CLASSES))
    step = StepCapture.of(linear, "0")
    with step:
        linear(x)
    assert head_tensors(step.head, step.head_path)[0] is x
    step.remove()
    with_dropout = nn.Sequential(nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(DIM, NUM_CLASSES)))
    step = StepCapture.of(with_dropout, "0")
    given = x.clone()
    with step:
        with_dropout(given)
    captured = head_tensors(step.head, step.head_path)[0]
    assert not torch.equal(given, x) and torch.equal(captured, x)  # the dropout overwrote its input, not the copy
    step.remove()
