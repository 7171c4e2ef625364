"""MultiMix on a Hugging Face ``*ForSequenceClassification`` with the callback alone: dict batches, ``ModelOutput``.

A small BERT is built from its config (nothing is downloaded) and trained on sentences generated here: each class
has its own vocabulary, mixed with shared filler words, padded to the batch's longest sentence. The batches are the
dicts Hugging Face models take (``input_ids``, ``attention_mask``, ``labels``); the module's ``training_step`` returns
the model's own loss. MultiMix reads the labels from ``labels``, finds the head from the ``logits`` the model
returns, and, since token ids cannot be interpolated, mixes the batches not mixed by MultiMix with last-layer pairs
instead of input mixup (said once in the log).

Run from the repository root::

    python -m examples.hf_text_classification
    python -m examples.hf_text_classification --max-steps 10
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_multimix import MultiMix

NUM_CLASSES, VOCAB, CLASS_WORDS, FILLER = 4, 64, 8, 16


def sentences(count: int, seed: int) -> list[dict[str, Tensor]]:
    """``count`` examples: 6 to 15 tokens, a third from the class's own words, the rest filler; token 0 is padding."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        label = i % NUM_CLASSES
        length = int(torch.randint(6, 16, (1,), generator=g))
        own = 1 + FILLER + label * CLASS_WORDS + torch.randint(0, CLASS_WORDS, (length,), generator=g)
        filler = 1 + torch.randint(0, FILLER, (length,), generator=g)
        ids = torch.where(torch.rand(length, generator=g) < 0.33, own, filler)
        examples.append({"input_ids": ids, "labels": torch.tensor(label)})
    return examples


def collate(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example["input_ids"])] = example["input_ids"]
        mask[row, :len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([e["labels"] for e in examples])}


class TextClassifier(L.LightningModule):
    """A plain LightningModule around a Hugging Face sequence classifier: its own loss, AdamW."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=NUM_CLASSES)
        self.model = BertForSequenceClassification(config)
        self.lr = lr

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(**batch).logits
        self.log("val/acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)
    callback = MultiMix(n_tuples=500)
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[callback], logger=False,
                        enable_checkpointing=False, accelerator="auto", devices=1)
    model, test_loader = TextClassifier(), DataLoader(sentences(200, seed=1), batch_size=100, collate_fn=collate)
    trainer.fit(model, DataLoader(sentences(800, seed=0), batch_size=32, shuffle=True, drop_last=True,
                                  collate_fn=collate), test_loader)
    scores = trainer.validate(model, test_loader, verbose=False)[0]
    print(f"head {callback.head_path!r}, batches {callback.batch_counts}, test accuracy {scores['val/acc']:.3f}")
    return scores


if __name__ == "__main__":
    main()
