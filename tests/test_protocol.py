"""The paper's training protocol: every batch mixed, by MultiMix with probability ``probability``, else by input
mixup (or the other batches' alternative), checked against expectations computed here.

Where the test needs to know the input-mixup draw, it replaces ``batch.mixup_pairing`` (the one place the callback draws
``lambda`` and the partner permutation) with a fixed one, then computes the expected inputs, targets and loss by hand.
"""

import copy
import logging
import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_multimix.batch as batch_module
from helpers import TinyCNN, TinyMLP, loader, tensors, trainer
from helpers_models import Classifier, PooledHead, quiet_trainer
from lightning_multimix import Dense, MultiMix, MultiMixError, MultiMixMixin, SelfDistillation
from lightning_multimix.sampling import mixup_pairing, seed_uniform, step_seed
from lightning_multimix.step import TrainingStep

LAM, PARTNER = 0.3, [2, 0, 3, 1]


@pytest.fixture
def fixed_pairing(monkeypatch):
    """Every input-mixup batch of 4 uses lambda = LAM and partner = PARTNER."""

    def fixed(num_examples, alpha=1.0, *, generator=None, device=None, dtype=torch.float32):
        assert num_examples == len(PARTNER)
        return torch.tensor(LAM, device=device, dtype=dtype), torch.tensor(PARTNER, device=device)

    monkeypatch.setattr(batch_module, "mixup_pairing", fixed)


@pytest.fixture
def input_mixup_only(monkeypatch):
    """Every batch goes to input mixup whatever the options (dense needs probability > 0 to be accepted)."""
    monkeypatch.setattr(TrainingStep, "kind", lambda self, index, rank: "input_mixup")


class SeeingMLP(TinyMLP):
    """Records the inputs of every step: training (after the callback mixed them), validation, test and predict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {"train": [], "val": [], "test": [], "predict": []}
        self.user_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen["train"].append(x.detach().clone())
        loss = nn.functional.cross_entropy(self(x), y)
        self.user_losses.append(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[0].clone())
        self(batch[0])

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(batch[0].clone())
        self(batch[0])

    def predict_step(self, batch, batch_idx):
        self.seen["predict"].append(batch[0].clone())
        return self(batch[0])


class Returned(L.Callback):
    """The loss every training step handed to the optimizer."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def mixed(values: Tensor) -> Tensor:
    return LAM * values + (1 - LAM) * values[PARTNER]


# ---------------------------------------------------------------------------------------------------- defaults, options


def test_defaults_are_the_papers_protocol():
    callback = MultiMix()
    assert (callback.mode, callback.n_tuples, callback.alpha, callback.tuple_size) == ("multimix", 1000, 1.0, None)
    assert (callback.probability, callback.other_batches, callback.mixup_alpha) == (0.5, "input_mixup", 1.0)
    assert callback.clean_loss_weight == 0.0  # mixed examples only


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(other_batches="cutmix"), "other_batches='cutmix'"),
        (dict(probability=1.0, other_batches="input_mixup"), "other_batches='input_mixup'.*probability=1.0"),
        (dict(probability=1.0, mixup_alpha=0.4), "mixup_alpha=0.4.*probability=1.0"),
        (dict(other_batches="own_loss", mixup_alpha=0.4), "mixup_alpha=0.4.*own_loss"),
        (dict(mixup_alpha=0.0), "mixup_alpha=0.0"),
        (dict(mixup_alpha=float("nan")), "mixup_alpha=nan"),
        (dict(probability=0.0, other_batches="own_loss"), "mixes no batch at all"),
        (dict(probability=0.0, n_tuples=500), "n_tuples=500.*probability=0.0"),
        (dict(probability=0.0, tuple_size=4), "tuple_size=4.*probability=0.0"),
        (dict(probability=0.0, dense=Dense()), "dense=Dense.*probability=0.0"),
    ],
)
def test_options_that_do_not_apply_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiMix(**kwargs)


# ---------------------------------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("probability", [0.25, 0.5, 0.75])
def test_share_of_batches_mixed_by_multimix(probability):
    """Each batch is mixed by MultiMix with chance ``probability``, independently, from the callback's seeded stream:
    the decisions are the documented ones, and their share is within 4 standard deviations of ``probability``."""
    steps, seed = 240, 11
    callback = MultiMix(n_tuples=8, seed=seed, probability=probability)
    trainer([callback], max_steps=steps, max_epochs=-1).fit(TinyMLP(), loader(n=16, batch_size=4))
    expected = sum(seed_uniform(step_seed(seed, 0, step)) < probability for step in range(steps))
    assert callback.batch_counts == {"multimix": expected, "input_mixup": steps - expected, "pairs": 0, "own_loss": 0}
    assert abs(expected / steps - probability) < 4 * math.sqrt(probability * (1 - probability) / steps)


def test_every_batch_is_mixed_by_default(fixed_pairing):
    """No batch trains on the user's clean loss: each returned loss is a MultiMix loss or the input-mixup loss."""
    torch.manual_seed(0)
    model, returned = SeeingMLP(lr=0.0), Returned()
    callback = MultiMix(n_tuples=8, seed=2)
    trainer([callback, returned], max_steps=8, max_epochs=-1).fit(model, loader(n=16, batch_size=4))
    assert callback.batch_counts["own_loss"] == 0
    assert callback.batch_counts["multimix"] > 0 and callback.batch_counts["input_mixup"] > 0
    for loss, user_loss in zip(returned.losses, model.user_losses):
        assert not torch.allclose(loss, user_loss)


# ---------------------------------------------------------------------------------------------------- input mixup


def test_input_mixup_batch_against_a_hand_computation(fixed_pairing):
    """The user's step sees ``lam x + (1 - lam) x[partner]``; the loss is the soft cross-entropy of its logits against
    ``lam Y + (1 - lam) Y[partner]`` (label smoothing included); one SGD step follows that loss's gradient."""
    torch.manual_seed(0)
    model, returned = SeeingMLP(lr=0.5), Returned()
    initial = copy.deepcopy(model)
    callback = MultiMix(probability=0.0, label_smoothing=0.1)
    trainer([callback, returned], max_steps=1).fit(model, loader(n=4, batch_size=4))
    x, y = tensors(4)
    torch.testing.assert_close(model.seen["train"][0], mixed(x))
    targets = mixed(torch.eye(3)[y]) * 0.9 + 0.1 / 3
    expected = soft_ce(initial(mixed(x)), targets)
    torch.testing.assert_close(returned.losses[0], expected.detach())
    assert callback.batch_counts["input_mixup"] == 1
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), initial.parameters()):
        torch.testing.assert_close(p.detach(), (q - 0.5 * q.grad).detach(), msg=name)


def test_lambda_and_partner_come_from_the_callbacks_stream():
    """The draw is ``mixup_pairing(b, mixup_alpha)`` from the generator seeded for the batch: reproducible, and so
    exactly restored on resume (see test_resume.py)."""
    torch.manual_seed(0)
    model = SeeingMLP(lr=0.0)
    trainer([MultiMix(probability=0.0, mixup_alpha=0.7, seed=5)], max_steps=2).fit(model, loader(n=8, batch_size=4))
    x, _ = tensors(8)
    for step in range(2):
        generator = torch.Generator().manual_seed(step_seed(5, 0, step))
        lam, partner = mixup_pairing(4, 0.7, generator=generator)
        batch = x[4 * step: 4 * step + 4]
        torch.testing.assert_close(model.seen["train"][step], lam * batch + (1 - lam) * batch[partner])


def test_clean_loss_weight_is_not_added_on_input_mixup_batches(fixed_pairing):
    torch.manual_seed(0)
    model, returned = SeeingMLP(lr=0.0), Returned()
    trainer([MultiMix(probability=0.0, clean_loss_weight=1.0), returned], max_steps=1).fit(model, loader(n=4))
    x, y = tensors(4)
    torch.testing.assert_close(returned.losses[0], soft_ce(model(mixed(x)), mixed(torch.eye(3)[y])).detach())


def test_validation_test_and_predict_are_never_mixed():
    torch.manual_seed(0)
    model = SeeingMLP()
    data = loader(n=8, batch_size=4)
    fit_trainer = trainer([MultiMix(probability=0.0)], max_steps=2, limit_val_batches=2, num_sanity_val_steps=0)
    fit_trainer.fit(model, data, data)
    fit_trainer.test(model, data, verbose=False)
    fit_trainer.predict(model, data)
    x, _ = tensors(8)
    assert not torch.equal(model.seen["train"][0], x[:4])  # training batches were mixed: the test can fail
    for stage in ("val", "test", "predict"):
        assert len(model.seen[stage]) == 2, stage
        assert torch.equal(torch.cat(model.seen[stage]), x), stage


def test_the_batch_is_not_modified_in_place(fixed_pairing):
    x, y = tensors(4)
    original = x.clone()

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batch = batch

    keep = Keep()
    trainer([MultiMix(probability=0.0), keep], max_steps=1).fit(TinyMLP(), DataLoader(TensorDataset(x, y), 4))
    assert torch.equal(keep.batch[0], original)


# ---------------------------------------------------------------------------------------------------- finding inputs


class DictImages(Dataset):
    def __init__(self, key: str = "image", n: int = 8) -> None:
        self.key = key
        self.x, self.y = tensors(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {self.key: self.x[i], "label": self.y[i], "index": i}


@pytest.mark.parametrize("key", ["image", "pixel_values", "x"])
def test_dict_batches_mix_the_usual_input_key(fixed_pairing, key):
    class Net(SeeingMLP):
        def training_step(self, batch, batch_idx):
            assert torch.equal(batch["index"], torch.arange(4))  # the rest of the batch is left alone
            return super().training_step((batch[key], batch["label"]), batch_idx)

    model = Net()
    callback = MultiMix(probability=0.0)
    trainer([callback], max_steps=1).fit(model, DataLoader(DictImages(key), batch_size=4))
    torch.testing.assert_close(model.seen["train"][0], mixed(tensors(8)[0][:4]))
    assert callback.batch_counts["input_mixup"] == 1


class TwoInputs(MultiMixMixin, TinyMLP):
    """Inputs under custom keys, two of them: the mixin mixes both with the same draw."""

    def multimix_labels(self, batch):
        return batch["cls"]

    def multimix_mix_inputs(self, batch, mix):
        return {**batch, "img": mix(batch["img"]), "extra": mix(batch["extra"])}

    def training_step(self, batch, batch_idx):
        self.seen = batch
        return nn.functional.cross_entropy(self(batch["img"] + batch["extra"]), batch["cls"])


class TwoInputData(Dataset):
    def __init__(self) -> None:
        self.x, self.y = tensors(4)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return {"img": self.x[i], "extra": 2 * self.x[i], "cls": self.y[i]}


def test_mixin_override_mixes_every_tensor_with_the_same_draw(fixed_pairing):
    model = TwoInputs()
    trainer([MultiMix(probability=0.0)], max_steps=1).fit(model, DataLoader(TwoInputData(), batch_size=4))
    x = tensors(4)[0]
    torch.testing.assert_close(model.seen["img"], mixed(x))
    torch.testing.assert_close(model.seen["extra"], mixed(2 * x))


def test_mixin_mixing_an_integer_tensor_is_an_error():
    class Bad(TwoInputs):
        def multimix_mix_inputs(self, batch, mix):
            return {**batch, "cls": mix(batch["cls"])}

    with pytest.raises(MultiMixError, match="int64.*floating-point.*Return None"):
        trainer([MultiMix(probability=0.0)], max_steps=1).fit(Bad(), DataLoader(TwoInputData(), batch_size=4))


class TokenClassifier(L.LightningModule):
    """Integer token ids: an embedding, a mean over tokens, a linear head. Input mixup cannot apply."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.embed(ids).mean(1))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_integer_inputs_fall_back_to_last_layer_pairs_said_once(caplog):
    class Spy(MultiMix):
        modes: list = []

        def sample_weights(self, num_examples, mode, generator, keep=None):
            self.modes.append(mode)
            return super().sample_weights(num_examples, mode, generator, keep)

    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 20, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g)
    callback = Spy(n_tuples=8, seed=0)
    with caplog.at_level(logging.INFO):
        trainer([callback], max_steps=12, max_epochs=-1).fit(TokenClassifier(), DataLoader(TensorDataset(ids, y), 4))
    counts = callback.batch_counts
    assert counts["input_mixup"] == 0 and counts["own_loss"] == 0
    assert counts["pairs"] > 0 and counts["multimix"] > 0 and counts["pairs"] + counts["multimix"] == 12
    assert Spy.modes.count("pairs") == counts["pairs"] and Spy.modes.count("multimix") == counts["multimix"]
    messages = [r.getMessage() for r in caplog.records if "cannot be interpolated" in r.getMessage()]
    assert len(messages) == 1 and "last-layer pairs" in messages[0]


def test_mixin_returning_none_falls_back_to_pairs():
    class NoInputs(TwoInputs):
        def multimix_mix_inputs(self, batch, mix):
            return None

    callback = MultiMix(probability=0.0)
    trainer([callback], max_steps=2).fit(NoInputs(), DataLoader(TwoInputData(), batch_size=2))
    assert callback.batch_counts == {"multimix": 0, "input_mixup": 0, "pairs": 2, "own_loss": 0}


# ---------------------------------------------------------------------------------------------------- other_batches


def test_other_batches_pairs_uses_pair_weights():
    seen = []

    class Spy(MultiMix):
        def sample_weights(self, num_examples, mode, generator, keep=None):
            weights = super().sample_weights(num_examples, mode, generator, keep)
            seen.append((mode, weights))
            return weights

    callback = Spy(seed=0, probability=0.0, other_batches="pairs", mixup_alpha=2.0)
    trainer([callback], max_steps=3, max_epochs=-1).fit(TinyMLP(), loader(n=16, batch_size=4))
    assert callback.batch_counts["pairs"] == 3 and [mode for mode, _ in seen] == ["pairs"] * 3
    for _, weights in seen:
        assert weights.shape == (4, 4) and bool(((weights > 0).sum(0) <= 2).all())


def test_other_batches_own_loss_trains_on_the_users_loss():
    torch.manual_seed(0)
    model, returned = SeeingMLP(), Returned()
    callback = MultiMix(n_tuples=8, seed=2, other_batches="own_loss")
    trainer([callback, returned], max_steps=8, max_epochs=-1).fit(model, loader(n=16, batch_size=4))
    own = [seed_uniform(step_seed(2, 0, step)) >= 0.5 for step in range(8)]
    assert callback.batch_counts["own_loss"] == sum(own) > 0
    for is_own, loss, user_loss in zip(own, returned.losses, model.user_losses):
        assert torch.equal(loss, user_loss) == is_own


# ---------------------------------------------------------------------------------------------------- composition


def test_distillation_on_an_input_mixup_batch_uses_the_teachers_view_of_the_mixed_inputs(fixed_pairing):
    """The teacher sees what the student saw (the mixed inputs); targets ``(1 - beta) mix(Y) + beta softmax(T(x~))``.
    At the first step the teacher is the student's copy, so its logits are the student's."""
    torch.manual_seed(0)
    model, returned = SeeingMLP(lr=0.0), Returned()
    callback = MultiMix(probability=0.0, distill=SelfDistillation(weight=0.6, warmup_steps=0, temperature=2.0))
    trainer([callback, returned], max_steps=1).fit(model, loader(n=4))
    x, y = tensors(4)
    logits = model(mixed(x))
    targets = 0.4 * mixed(torch.eye(3)[y]) + 0.6 * torch.softmax(logits / 2.0, dim=-1)
    torch.testing.assert_close(returned.losses[0], soft_ce(logits, targets).detach())


def test_dense_checks_the_feature_map_on_the_first_batch_even_when_it_is_input_mixed(fixed_pairing, input_mixup_only):
    class WrongMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 8, 3, padding=1)
            self.other = nn.Conv2d(2, 8, 1)  # named as the map, but not what feeds the head
            self.head = PooledHead(8, 3)

        def forward(self, x):
            self.other(x)
            return self.head(self.conv(x))

    module = Classifier(WrongMap())
    callback = MultiMix(dense=Dense(feature_map="net.other"), head="net.head.fc")
    x, y = tensors(4, image=True)
    with pytest.raises(MultiMixError, match="does not match"):
        quiet_trainer([callback], max_steps=1).fit(module, DataLoader(TensorDataset(x, y), batch_size=4))


def test_dense_protocol_input_mixup_batches_use_the_pooled_logits(fixed_pairing, input_mixup_only):
    torch.manual_seed(0)
    model, returned = TinyCNN(lr=0.0), Returned()
    x, y = tensors(4, image=True)
    y = torch.tensor([0, 1, 2, 0])  # tensors(4, image=True) draws four equal labels: mixing them would change nothing
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    callback = MultiMix(dense=Dense())
    trainer([callback, returned], max_steps=1).fit(model, data)
    assert callback.batch_counts["input_mixup"] == 1
    torch.testing.assert_close(returned.losses[0], soft_ce(model(mixed(x)), mixed(torch.eye(3)[y])).detach())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_protocol_under_bf16(precision):
    torch.manual_seed(0)
    model, returned = TinyMLP(), Returned()
    callback = MultiMix(n_tuples=8, seed=2)
    trainer([callback, returned], max_steps=6, max_epochs=-1, precision=precision).fit(model, loader(n=16))
    assert callback.batch_counts["input_mixup"] > 0 and callback.batch_counts["multimix"] > 0
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in returned.losses)
