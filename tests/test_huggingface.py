"""Hugging Face ``transformers`` classifiers with the callback alone (built from small configs, no download): dict
batches with ``labels``, ``ModelOutput`` objects, integer ``input_ids`` (no input mixup: last-layer pairs instead),
image models (input mixup on ``pixel_values``), and dense mode over token states with the attention mask."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers", reason="pip install 'lightning-multimix[ecosystem]'")

import lightning as L  # noqa: E402

from helpers_models import quiet_trainer  # noqa: E402
from lightning_multimix import Dense, MultiMix, MultiMixError, SelfDistillation  # noqa: E402

transformers.logging.set_verbosity_error()
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert(num_labels: int = 3, dropout: float = 0.0) -> nn.Module:
    options = {**TINY, "hidden_dropout_prob": dropout}  # the dropout before the classifier (BERT's default is 0.1)
    config = transformers.BertConfig(vocab_size=50, max_position_embeddings=32, num_labels=num_labels, **options)
    return transformers.BertForSequenceClassification(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, **TINY)
    return transformers.ViTForImageClassification(config)


class HFModule(L.LightningModule):
    """The usual way: the model's own loss from a dict batch."""

    def __init__(self, model: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def text(n: int = 8, length: int = 10, pad_from: int = 7, pad_ids: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, pad_from:] = 0  # every other sentence is padded
    ids[mask == 0] = pad_ids if isinstance(pad_ids, int) else pad_ids[mask == 0]
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)} for i in range(n)]


class Returned(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


def test_sequence_classifier_dict_batches_and_model_output_logits():
    """The head is found from the ``logits`` the model returns; the loss is the MultiMix loss of those logits."""
    torch.manual_seed(0)
    module, returned = HFModule(bert(), lr=0.0), Returned()
    weights = torch.distributions.Dirichlet(torch.ones(4)).sample((6,)).T

    class Fixed(MultiMix):
        def sample_weights(self, num_examples, mode, generator, keep=None):
            return weights

    callback = Fixed(n_tuples=6, probability=1.0)
    batches = text()
    quiet_trainer([callback, returned], max_steps=1).fit(module, DataLoader(batches, batch_size=4))
    assert callback.head_path == "model.classifier"
    batch = {k: torch.stack([b[k] for b in batches[:4]]) for k in batches[0]}
    with torch.no_grad():
        logits = module.model(**batch).logits
    targets = torch.eye(3)[batch["labels"]]
    expected = -((weights.T @ targets) * (weights.T @ logits).log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(returned.losses[0], expected)


def test_token_ids_fall_back_to_last_layer_pairs_with_distillation(caplog):
    callback = MultiMix(n_tuples=8, seed=0, distill=SelfDistillation(warmup_steps=0))
    with caplog.at_level(logging.INFO):
        quiet_trainer([callback], max_steps=4, max_epochs=-1).fit(HFModule(bert(dropout=0.1)),
                                                                  DataLoader(text(), batch_size=4))
    counts = callback.batch_counts
    assert counts["input_mixup"] == 0 and counts["pairs"] > 0 and counts["pairs"] + counts["multimix"] == 4
    assert any("cannot be interpolated" in r.getMessage() for r in caplog.records)
    assert callback.teacher.num_updates == 4


def test_image_classifier_mixes_pixel_values_and_dense_reads_the_tokens():
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)} for i in range(8)]
    callback = MultiMix(n_tuples=8, seed=0, dense=Dense())
    quiet_trainer([callback], max_steps=4, max_epochs=-1).fit(HFModule(vit()), DataLoader(images, batch_size=4))
    assert callback.batch_counts["input_mixup"] > 0 and callback.batch_counts["multimix"] > 0
    assert callback.feature_map_spec == ("model.vit", "tokens")  # the head reads the first (CLS) token


def test_dense_on_a_pooler_output_head_is_a_clear_error():
    with pytest.raises(MultiMixError, match="neither the mean of the token states.*first token.*pooler"):
        quiet_trainer([MultiMix(n_tuples=8, dense=Dense())], max_steps=1).fit(HFModule(bert()),
                                                                              DataLoader(text(), batch_size=4))


class MeanPooled(L.LightningModule):
    """An encoder, the mean of its unpadded token states, a linear classifier: what dense mode mixes per token."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=50, max_position_embeddings=32, **TINY)
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).float()
        return self.classifier((states * weights).sum(1) / weights.sum(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_dense_over_tokens_never_mixes_padding():
    """The attention mask keeps the padded tokens out of the real tokens' states; dense mode must keep them out of
    the mixing too: whatever the ids at padded positions, the loss is the same (and it is not when the mask is
    ignored: the test can fail)."""
    losses = {}
    for name, pad in (("zeros", 0), ("other ids", torch.randint(1, 50, (8, 10), generator=torch.Generator()))):
        torch.manual_seed(0)
        module, returned = MeanPooled(), Returned()
        callback = MultiMix(n_tuples=8, seed=0, probability=1.0, dense=Dense())
        quiet_trainer([callback, returned], max_steps=1).fit(module, DataLoader(text(pad_ids=pad), batch_size=4))
        assert callback.feature_map_spec == ("encoder", "tokens")
        losses[name] = returned.losses[0]
    torch.testing.assert_close(losses["zeros"], losses["other ids"])
    assert torch.isfinite(losses["zeros"])
    # the same model with padding treated as tokens would depend on those ids
    module = MeanPooled()
    batch = {k: torch.stack([b[k] for b in text(pad_ids=7)[:4]]) for k in text()[0]}
    states = [module.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
              for ids in (batch["input_ids"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 3))]
    assert not torch.allclose(states[0], states[1])  # padded positions' own states do change with their ids
