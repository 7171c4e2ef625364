"""Labels per position (segmentation masks, token tags): the per-position MultiMix loss against a loop written here,
its bounded memory, and modules that train with ``callbacks=[MultiMix()]`` alone on the reference loss."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
from helpers import RecordingMultiMix, run_script, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_multimix import Dense, MultiMix, MultiMixError, SelfDistillation, mixup_objective, multimix_objective
from lightning_multimix.options import TYPE_DEFAULTS
from lightning_multimix.positions import chunk_size, class_dims, position_multimix_loss
from lightning_multimix.sampling import dirichlet_weights
from lightning_multimix.targets import LossFit, Targets

C = 5  # classes


def loop_loss(logits: Tensor, labels: Tensor, weights: Tensor, ignore: int, eps: float = 0.0) -> Tensor:
    """``(m, c, P)`` logits: each interpolation at each position, ignored examples out and the others renormalised;
    the mean over the (interpolation, position) pairs that keep a label."""
    c, terms = logits.shape[1], []
    for k in range(weights.shape[1]):
        for p in range(logits.shape[2]):
            w = weights[:, k] * (labels[:, p] != ignore)
            if w.sum() == 0:
                continue
            w = w / w.sum()
            z = (w[:, None] * logits[:, :, p]).sum(0)
            t = (w[:, None] * F.one_hot(labels[:, p].clamp(0, c - 1), c).float()).sum(0) * (1 - eps) + eps / c
            terms.append(-(t * torch.log_softmax(z, 0)).sum())
    return torch.stack(terms).mean()


def draws(m: int = 4, p: int = 6, n: int = 7, seed: int = 0, ignore: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, C, p, generator=g)
    labels = torch.randint(0, C, (m, p), generator=g)
    if p > 3:
        labels[0, :2] = ignore
        labels[:, 3] = ignore  # a position no example keeps
    return logits, labels, dirichlet_weights(m, n, generator=g)


# ---------------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("chunk", [1, 3, None, 100])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_position_loss_and_gradient_equal_the_loop(chunk, eps):
    logits, labels, weights = draws()
    logits.requires_grad_(True)
    expected = loop_loss(logits, labels, weights, -100, eps)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    got = position_multimix_loss(logits, labels, weights, -100, eps, chunk)
    (grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_a_position_ignored_by_every_example_leaves_the_loss():
    logits, labels, weights = draws()
    kept = [p for p in range(labels.shape[1]) if p != 3]
    torch.testing.assert_close(position_multimix_loss(logits, labels, weights, -100),
                               position_multimix_loss(logits[:, :, kept], labels[:, kept], weights, -100))


def test_one_position_is_image_level_multimix():
    logits, labels, weights = draws(p=1, seed=1)
    labels = labels.clamp_min(0)
    torch.testing.assert_close(multimix_objective(weights, labels, logits=logits),
                               multimix_objective(weights, labels[:, 0], logits=logits[:, :, 0]))


def test_chunks_hold_a_bounded_multiple_of_the_logits():
    for b, c in [(16, 11), (2, 1000), (512, 2)]:  # four (k, c, P) tensors per chunk, at most 4 b c P values
        k = chunk_size(b, c, 4096)
        assert k >= 1 and (k == 1 or 4 * k * c <= 4 * b * c)
    assert chunk_size(16, 11, 4096, factor=1) < chunk_size(16, 11, 4096)


def test_class_dims_tell_masks_from_tags():
    assert class_dims((2, 5, 8, 9), (2, 8, 9)) == (1,)
    assert class_dims((2, 7, 5), (2, 7)) == (-1,)
    assert class_dims((2, 5, 5), (2, 5)) == (1, -1)  # the shapes cannot tell: the user's loss does
    assert class_dims((2, 5, 4, 4), (2, 8, 8)) == ()


def test_mixup_objective_per_position_is_the_lerp_of_two_cross_entropies():
    logits, labels, _ = draws(seed=2)
    labels[:, 3] = 0  # F.cross_entropy's NaN when every label is ignored is its own business
    lam, partner = torch.tensor(0.3), torch.tensor([2, 3, 0, 1])
    expected = 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(logits, labels[partner])
    torch.testing.assert_close(mixup_objective(logits, labels, lam, partner), expected)


def test_the_objective_refuses_what_does_not_apply_per_position():
    logits, labels, weights = draws()
    with pytest.raises(ValueError, match="per position take `logits`"):
        multimix_objective(weights, labels, logits=logits, loss="bce")
    with pytest.raises(ValueError, match="same m and P"):
        multimix_objective(weights, labels, logits=logits[:, :, :2])
    with pytest.raises(ValueError, match="applies to labels per position"):
        multimix_objective(weights, labels[:, 0].clamp_min(0), logits=logits[:, :, 0], ignore_index=-100)


# ---------------------------------------------------------------------------------------------------- the callback


class Segmenter(L.LightningModule):
    """A small fully convolutional network: its forward upsamples the 1x1 convolution's logits to the input size."""

    def __init__(self, loss: str = "ce", ignore_index: int = 255, lr: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.classifier = nn.Conv2d(6, C, 1)
        self.loss, self.ignore_index, self.lr = loss, ignore_index, lr

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.classifier(self.body(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.loss == "dice":
            probs, one_hot = logits.softmax(1), F.one_hot(y.clamp(0, C - 1), C).movedim(-1, 1).float()
            return 1 - (2 * (probs * one_hot).sum() + 1) / (probs.sum() + one_hot.sum() + 1)
        if self.loss == "weighted":
            return F.cross_entropy(logits, y, weight=torch.arange(1.0, C + 1), ignore_index=self.ignore_index)
        return F.cross_entropy(logits, y, ignore_index=self.ignore_index,
                               label_smoothing=0.1 if self.loss == "smoothed" else 0.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def masks(n: int = 16, size: int = 8, ignore: int = 255, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 1, size, size, generator=g), torch.randint(0, C, (n, size, size), generator=g)
    labels[:, 0] = ignore  # a row every image ignores
    labels[0, 3:] = ignore
    return images, labels


def fit_segmenter(model: L.LightningModule, callback: MultiMix, ignore: int = 255, **kwargs: Any) -> None:
    images, labels = masks(ignore=ignore)
    torch.manual_seed(0)
    trainer(callbacks=[callback], **kwargs).fit(model, DataLoader(TensorDataset(images, labels), batch_size=4))


@pytest.mark.parametrize("loss, eps", [("ce", 0.0), ("smoothed", 0.1)])
def test_a_segmentation_module_trains_with_the_callback_alone_on_the_reference_loss(loss, eps):
    torch.manual_seed(0)
    model, callback = Segmenter(loss), RecordingMultiMix(seed=0, n_tuples=6)
    fit_segmenter(model, callback)  # lr 0: the weights stay put, so the references can be computed after the fit
    assert callback.batch_counts["multimix"] == 4 and callback.head_path == ""  # the module's forward upsamples
    for (x, y), weights, got in zip(callback.batches, callback.weights, callback.losses):
        with torch.no_grad():
            logits = model(x)
        expected = loop_loss(logits.flatten(2), y.flatten(1), weights, 255, eps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_segmentation_trains_with_the_protocol_and_moves_the_weights():
    model = Segmenter(lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    callback = MultiMix(seed=0, n_tuples=8)  # the paper's protocol: input mixup on the other batches
    fit_segmenter(model, callback, max_epochs=2)
    assert callback.batch_counts["input_mixup"] > 0 and callback.batch_counts["multimix"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_named_head_before_the_upsampling_mixes_its_logits_and_resizes_them_exactly():
    """``head='classifier'``: its (b, c, 4, 4) logits, resized as the loss reads them (bilinear: linear, so it
    commutes with the mixing) give the losses of the (b, c, 8, 8) logits the forward returns."""
    named, found = RecordingMultiMix(seed=0, n_tuples=6, head="classifier"), RecordingMultiMix(seed=0, n_tuples=6)
    for callback in (named, found):
        torch.manual_seed(0)
        fit_segmenter(Segmenter(), callback)
    assert named.head_path == "classifier" and found.head_path == ""
    torch.testing.assert_close(torch.stack(named.losses), torch.stack(found.losses))


def test_pairs_mix_each_position_of_two_examples():
    callback = RecordingMultiMix(seed=0, mode="pairs")
    model = Segmenter()
    fit_segmenter(model, callback)
    (x, y), weights, got = callback.batches[0], callback.weights[0], callback.losses[0]
    assert weights.shape == (4, 4) and ((weights > 0).sum(0) <= 2).all()
    with torch.no_grad():
        torch.testing.assert_close(got, loop_loss(model(x).flatten(2), y.flatten(1), weights, 255))


@pytest.mark.parametrize("options, loss, match", [
    (dict(dense=Dense()), "ce", "`dense=Dense"),
    (dict(distill=SelfDistillation()), "ce", "`distill="),
    (dict(logit_space="never"), "ce", "logit_space='never'"),
    ({}, "dice", "Dice"),
    ({}, "weighted", "class weights"),
    (dict(ignore_index=3), "ce", "ignore_index=3. is one of the 5 classes"),
    (dict(head="body.0"), "ce", r"'body.0' \(4, 6, 8, 8\); the cross-entropy of none of them explains"),
])
def test_what_per_position_mixing_cannot_carry_is_refused_with_the_fix(options, loss, match):
    with pytest.raises(MultiMixError, match=match):
        fit_segmenter(Segmenter(loss), MultiMix(seed=0, n_tuples=4, probability=1.0, **options))


def test_labels_per_position_take_their_own_default_settings(caplog):
    default = RecordingMultiMix(seed=0)
    given = RecordingMultiMix(seed=0, n_tuples=1000, tuple_size=4, alpha=1.0)  # batches of 4
    for callback in (default, given):
        fit_segmenter(Segmenter(), callback)
    assert TYPE_DEFAULTS["positions"] == {"n_tuples": 64, "tuple_size": 2, "alpha": 0.2}
    assert {w.shape[1] for w in default.weights} == {64}
    assert {int(c) for w in default.weights for c in (w > 0).sum(0)} <= {1, 2}  # pairs: two examples at most
    assert {w.shape[1] for w in given.weights} == {1000}  # set: as given, the whole batch
    assert all(bool((w > 0).all()) for w in given.weights)
    assert "n_tuples=64, tuple_size=2, alpha=0.2, the defaults for labels per position" in caplog.text


def test_an_ignore_index_given_explicitly_may_be_positive():
    callback = RecordingMultiMix(seed=0, n_tuples=4, ignore_index=255)
    model = Segmenter()
    fit_segmenter(model, callback)
    (x, y), weights, got = callback.batches[0], callback.weights[0], callback.losses[0]
    with torch.no_grad():
        torch.testing.assert_close(got, loop_loss(model(x).flatten(2), y.flatten(1), weights, 255))


def test_the_health_check_counts_labels_per_position_that_are_neither_a_class_nor_ignored():
    targets = Targets(num_classes=C, ignore_index=255, label_smoothing=0.0, loss=LossFit(0.0, False), positions=True)
    labels = torch.tensor([[0, 255, 7], [4, -1, 255]])
    assert targets.keep(labels) is None  # every example is mixed; the loss leaves the ignored positions out
    assert targets.outside(labels).tolist() == [[False, False, True], [False, True, False]]


# ---------------------------------------------------------------------------------------------------- tokens


class Tagger(L.LightningModule):
    """A Hugging Face token classifier from a small config (no dropout): its own loss, -100 at padding."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, num_labels=C,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.model = transformers.BertForTokenClassification(config)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 7) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (n, length), generator=g)
        self.labels = torch.randint(0, C, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        for i in range(n):  # padding at the end, its label -100
            pad = i % 3
            if pad:
                self.ids[i, -pad:], self.labels[i, -pad:], self.mask[i, -pad:] = 0, -100, 0
        self.labels[:, 0] = -100  # [CLS]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_a_token_classifier_trains_with_the_callback_alone_on_the_reference_loss():
    torch.manual_seed(0)
    model, data = Tagger(), Tokens()
    callback = RecordingMultiMix(seed=0, n_tuples=5, probability=0.5)  # token ids: pairs on the other batches
    trainer(callbacks=[callback]).fit(model, DataLoader(data, batch_size=4))
    assert callback.head_path == "model.classifier"  # the innermost module whose output the loss reads
    counts = callback.batch_counts
    assert counts["input_mixup"] == 0 and counts["multimix"] > 0 and counts["pairs"] > 0
    for i, (weights, got) in enumerate(zip(callback.weights, callback.losses)):  # every batch: at the last layer
        rows = slice(4 * i, 4 * i + 4)
        with torch.no_grad():
            logits = model.model(input_ids=data.ids[rows], attention_mask=data.mask[rows]).logits
        torch.testing.assert_close(got, loop_loss(logits.transpose(1, 2), data.labels[rows], weights, -100),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- resume, precision


def fit_steps(max_steps: int, tmp_path: Any = None, ckpt_path: Any = None, global_seed: int = 0, **kwargs: Any):
    """Segmentation under the paper's protocol (seed 3: both kinds of batch in 4 steps), epochs of 2 batches."""
    torch.manual_seed(global_seed)
    model, callback = Segmenter(lr=0.1), RecordingMultiMix(n_tuples=6, seed=3, probability=0.5)
    callbacks = [callback]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}"))
    images, labels = masks(n=8)
    trainer(callbacks, max_steps=max_steps, max_epochs=-1, enable_checkpointing=tmp_path is not None, **kwargs).fit(
        model, DataLoader(TensorDataset(images, labels), batch_size=4), ckpt_path=ckpt_path)
    return model, callback


def test_resume_is_bit_exact(tmp_path):
    full_model, full = fit_steps(4)
    fit_steps(2, tmp_path=tmp_path)
    resumed_model, resumed = fit_steps(4, ckpt_path=str(tmp_path / "step=2.ckpt"), global_seed=123)
    assert full.batch_counts["multimix"] > 0 and full.batch_counts["input_mixup"] > 0
    for loss, expected in zip(resumed.step_losses, full.step_losses[2:]):
        assert torch.equal(loss, expected)
    for key, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_bf16_mixed_precision_trains_on_float32_losses_close_to_full_precision():
    _, full = fit_steps(4)
    _, half = fit_steps(4, precision="bf16-mixed")
    assert all(loss.dtype == torch.float32 for loss in half.step_losses)
    torch.testing.assert_close(torch.stack(half.step_losses), torch.stack(full.step_losses), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------- DDP


SYNC_B, SYNC_N = 4, 5


def sync_weights() -> dict[int, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {rank: dirichlet_weights(2 * SYNC_B, SYNC_N, alpha=0.5, generator=g) for rank in range(2)}


def fit_sync(out_dir: str) -> None:
    """One step of 2 processes with ``sync_batch=True`` and known weights; each rank writes ``rank{r}.pt``."""
    torch.manual_seed(0)
    model = Segmenter(lr=0.1)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(model.state_dict(), Path(out_dir) / "initial.pt")
    callback = RecordingMultiMix(n_tuples=SYNC_N, sync_batch=True, fixed=sync_weights(), out_dir=out_dir)
    images, labels = masks(n=2 * SYNC_B)
    trainer([callback], devices=2, strategy="ddp", max_steps=1).fit(
        model, DataLoader(TensorDataset(images, labels), batch_size=SYNC_B))


@pytest.mark.slow
def test_sync_batch_mixes_the_global_batch_of_per_position_logits(tmp_path):
    script = tmp_path / "fit_sync.py"
    script.write_text("import sys\nimport helpers, test_positions\ntest_positions.fit_sync(sys.argv[1])\n"
                      "helpers.destroy_process_group()\n")
    run_script(script, str(tmp_path))
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = Segmenter()
    model.load_state_dict(torch.load(tmp_path / "initial.pt"))
    images = torch.cat([r["batches"][0][0] for r in records])  # the global batch, in rank order
    labels = torch.cat([r["batches"][0][1] for r in records])
    losses = []
    for rank, weights in sync_weights().items():
        loss = loop_loss(model(images).flatten(2), labels.flatten(1), weights, 255)
        torch.testing.assert_close(records[rank]["losses"][0], loss.detach(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(model.parameters()))  # DDP averages the ranks'
    for (name, _), grad in zip(model.named_parameters(), grads):
        torch.testing.assert_close(records[0]["grads"][name], grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- Hugging Face


class HuggingFaceSegmenter(L.LightningModule):
    """A SegFormer from a small config: logits at a quarter of the size, its own loss on them upsampled (ignore 255)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.SegformerConfig(num_channels=1, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                              hidden_sizes=[8, 16], num_attention_heads=[1, 2], decoder_hidden_size=16,
                                              num_labels=C, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                              classifier_dropout_prob=0.0, drop_path_rate=0.0)
        self.model = transformers.SegformerForSemanticSegmentation(config)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, masks = batch
        return self.model(pixel_values=images, labels=masks).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_hugging_face_segmentation_model_trains_with_the_callback_alone_on_the_reference_loss():
    torch.manual_seed(0)
    model, callback = HuggingFaceSegmenter(), RecordingMultiMix(seed=0, n_tuples=6)
    images, labels = masks(size=16)
    trainer(callbacks=[callback]).fit(model, DataLoader(TensorDataset(images, labels), batch_size=4))
    assert callback.batch_counts["multimix"] == 4
    for (x, y), weights, got in zip(callback.batches, callback.weights, callback.losses):
        with torch.no_grad():  # in training mode, as in the fit: its batch norm normalises by the batch
            logits = model.model(pixel_values=x).logits  # (b, c, 4, 4): the loss reads them upsampled
        assert logits.shape[-1] == 4
        full = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got, loop_loss(full.flatten(2), y.flatten(1), weights, 255), rtol=1e-5, atol=1e-6)
