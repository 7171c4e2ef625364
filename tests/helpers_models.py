"""Tiny models, a quiet trainer and a recording MultiMix for the dense and distillation tests.

Kept apart from ``helpers.py`` (the DDP and production-training tests') so that each file has one owner.
"""

from __future__ import annotations

import functools

from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import trainer
from lightning_multimix import MultiMix


#: the tests' quiet CPU trainer, without the sanity check
quiet_trainer = functools.partial(trainer, num_sanity_val_steps=0)


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """In order, no shuffling: every run sees the same batches."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Classifier(L.LightningModule):
    """A user's module around any ``nn.Module`` classifier: plain cross-entropy, SGD, a logged validation loss."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), on_epoch=True, on_step=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PooledHead(nn.Module):
    """``fc(mean over positions of the input)``: the input *is* the feature map ``(b, d, h, w)``, so a test knows it."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))


class TinyConv(nn.Module):
    """conv (-> batch norm) -> relu -> global average pool -> ``fc``; a ``(b, 2, 4, 4)`` input gives a 4x4 map."""

    def __init__(self, num_classes: int = 3, channels: int = 8, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(2, channels, 3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        self.features = nn.Sequential(*layers, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class TinyMLP(nn.Module):
    """linear (-> batch norm) -> tanh -> ``fc``; deterministic in train mode without batch norm."""

    def __init__(self, dim: int = 5, hidden: int = 8, num_classes: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        self.body = nn.Sequential(*layers, nn.Tanh())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class Recording(MultiMix):
    """MultiMix that uses the weights ``weights(m, device)`` gives (when given) and records its weights, losses,
    the teacher's outputs and the gradients of the first step. Every batch is mixed by MultiMix unless
    ``probability`` says otherwise (these tests are about the MultiMix batches; the protocol has its own)."""

    def __init__(self, *args: Any, weights: Optional[Callable[[int], Tensor]] = None, **kwargs: Any) -> None:
        kwargs.setdefault("probability", 1.0)
        super().__init__(*args, **kwargs)
        self.fixed_weights = weights
        self.drawn: list[Tensor] = []
        self.losses: list[Tensor] = []
        self.teacher_outputs: list[tuple[Tensor, Tensor]] = []
        self.grads: dict[str, Tensor] = {}
        self._recorded = 0

    def sample_weights(self, num_examples: int, mode: str, generator: torch.Generator, keep=None) -> Tensor:
        if self.fixed_weights is None:
            weights = super().sample_weights(num_examples, mode, generator, keep)
        else:
            weights = self.fixed_weights(num_examples).to(generator.device)
        self.drawn.append(weights.detach().clone())
        return weights

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.distiller is not None:  # record the teacher's view of every batch
            outputs = self.distiller.outputs

            def recording(*args: Any, **kwargs: Any) -> Any:
                result = outputs(*args, **kwargs)
                self.teacher_outputs.append((result.embeddings, result.logits))
                return result

            self.distiller.outputs = recording

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        mixed_at_last_layer = self.batch_counts["multimix"] + self.batch_counts["pairs"]
        if mixed_at_last_layer > self._recorded:  # this batch was mixed at the last layer: record its loss
            self._recorded = mixed_at_last_layer
            self.losses.append(outputs["loss"].detach().clone())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.grads:
            self.grads = {k: p.grad.detach().clone() for k, p in pl_module.named_parameters() if p.grad is not None}


class ParamRecorder(L.Callback):
    """Snapshots the student's parameters and buffers after every optimizer step (at ``on_train_batch_end``)."""

    def __init__(self) -> None:
        self.params: list[dict[str, Tensor]] = []
        self.buffers: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})
        self.buffers.append({k: v.detach().clone() for k, v in pl_module.named_buffers()})


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean over rows of -sum_c t_c log softmax(logits)_c``, written out for the tests."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
