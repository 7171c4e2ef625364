"""``SegmentationModel``: a plain LightningModule for semantic segmentation, the demo's ``--task segment``.

Like :class:`~lightning_multimix.demo.classifier.ImageClassifier` it is deliberately ordinary: per-pixel
cross-entropy ``F.cross_entropy(self(images), masks)`` on clean batches, SGD, a learning-rate schedule; MultiMix comes
from the callback. ``input_mix`` trains it with the usual input-space peers instead, written here because torchvision's
``v2.MixUp`` / ``v2.CutMix`` take one label per image, not a mask:

* ``"mixup"``: images lerped with a permuted batch, the targets the same lerp of the one-hot masks, ``(b, c, H, W)``
  probabilities (:func:`mixup_segmentation`), trained with ``F.cross_entropy(logits, soft_targets)``;
* ``"cutmix"``: a box of the permuted batch pasted into the images and the same box of its masks into the masks (as
  Composer's CutMix does for segmentation, :func:`cutmix_segmentation`), trained with the plain cross-entropy on the
  pasted masks. The box follows the CutMix paper: area ratio ``1 - lambda``, ``lambda ~ Beta(alpha, alpha)``, centre
  uniform over the image, clipped to it (:func:`cutmix_box`).

Every draw (``lambda``, the permutation, the box's centre: :func:`draw_mix`) comes from the module's own
``torch.Generator`` on the CPU, seeded by ``seed`` and saved in checkpoints, never from the global RNG.

Logged names: ``train/loss``, ``val/loss``, ``val/miou``, ``test/loss``, ``test/miou`` (the mean intersection over
union, torchmetrics' ``MulticlassJaccardIndex(average="macro")`` over every class, background included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_multimix.demo.classifier import check_sgd, configure_sgd
from lightning_multimix.demo.models import SmallFCN
from lightning_multimix.interpolation import mix_with_partner
from lightning_multimix.sampling import mixup_pairing

#: ``input_mix`` values of :class:`SegmentationModel`
SEGMENTATION_MIXES = ("mixup", "cutmix")


@dataclass(frozen=True)
class MixDraw:
    """One batch's random draw: ``lam`` (0-dim), the ``partner`` permutation ``(b,)`` and, for CutMix, the ``box``
    ``(top, bottom, left, right)`` pasted from the partners."""

    lam: Tensor
    partner: Tensor
    box: Optional[tuple[int, int, int, int]] = None


def cutmix_box(lam: float, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix's box ``(top, bottom, left, right)``: sides ``sqrt(1 - lam)`` of the image's (area ``1 - lam``), centre
    drawn uniformly over the pixels from ``generator``, clipped to the image (so the area may be smaller).

    Example:
        >>> top, bottom, left, right = cutmix_box(0.75, 56, 56, torch.Generator().manual_seed(0))
        >>> 0 <= top < bottom <= 56 and 0 <= left < right <= 56 and bottom - top <= 28 and right - left <= 28
        True
        >>> top, bottom, left, right = cutmix_box(1.0, 56, 56, torch.Generator().manual_seed(0))
        >>> top == bottom and left == right  # lam = 1: nothing pasted
        True
    """
    half_height, half_width = int(0.5 * math.sqrt(1.0 - lam) * height), int(0.5 * math.sqrt(1.0 - lam) * width)
    centre_y, centre_x = (int(torch.randint(size, (), generator=generator)) for size in (height, width))
    return (max(centre_y - half_height, 0), min(centre_y + half_height, height),
            max(centre_x - half_width, 0), min(centre_x + half_width, width))


def draw_mix(kind: Literal["mixup", "cutmix"], batch_size: int, size: tuple[int, int], alpha: float,
             generator: torch.Generator) -> MixDraw:
    """The draw of ``kind`` for a batch of ``batch_size`` images of ``size`` ``(H, W)``, from ``generator``."""
    lam, partner = mixup_pairing(batch_size, alpha, generator=generator, device=generator.device)
    box = cutmix_box(float(lam), *size, generator) if kind == "cutmix" else None
    return MixDraw(lam, partner, box)


def mixup_segmentation(images: Tensor, masks: Tensor, draw: MixDraw, num_classes: int) -> tuple[Tensor, Tensor]:
    """Input mixup of a segmentation batch: ``(mixed images, soft targets (b, c, H, W))``, the targets the same lerp
    of the one-hot masks, so they sum to 1 at every pixel.

    Example:
        >>> images, masks = torch.arange(2.0).view(2, 1, 1, 1), torch.tensor([[[0]], [[2]]])
        >>> mixed, targets = mixup_segmentation(images, masks, MixDraw(torch.tensor(0.75), torch.tensor([1, 0])), 3)
        >>> mixed.flatten().tolist(), targets[0].flatten().tolist()
        ([0.25, 0.75], [0.75, 0.0, 0.25])
    """
    one_hot = F.one_hot(masks, num_classes).movedim(-1, 1).to(images.dtype)
    lam, partner = draw.lam.to(images.device), draw.partner.to(images.device)
    return mix_with_partner(images, lam, partner), mix_with_partner(one_hot, lam, partner)


def cutmix_segmentation(images: Tensor, masks: Tensor, draw: MixDraw) -> tuple[Tensor, Tensor]:
    """CutMix of a segmentation batch: ``(images, masks)`` with ``draw.box`` of each partner's image and mask pasted
    into the example's (new tensors; the inputs are unchanged).

    Example:
        >>> images, masks = torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
        >>> images[1], masks[1] = 1.0, 5
        >>> pasted, labels = cutmix_segmentation(images, masks, MixDraw(torch.tensor(0.5), torch.tensor([1, 0]),
        ...                                                             (0, 2, 1, 3)))
        >>> pasted[0, 0].tolist()[:3], labels[0].tolist()[:3]
        ([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[0, 5, 5, 0], [0, 5, 5, 0], [0, 0, 0, 0]])
    """
    if draw.box is None:
        raise ValueError("cutmix_segmentation: the draw has no box; draw it with draw_mix('cutmix', ...).")
    top, bottom, left, right = draw.box
    partner = draw.partner.to(images.device)
    images, masks = images.clone(), masks.clone()
    images[..., top:bottom, left:right] = images[partner, ..., top:bottom, left:right]
    masks[..., top:bottom, left:right] = masks[partner, ..., top:bottom, left:right]
    return images, masks


class SegmentationModel(L.LightningModule):
    """Semantic segmentation with SGD and per-pixel cross-entropy; MultiMix comes from the callback.

    ``batch[0]`` is ``(b, C, H, W)`` images, ``batch[1]`` ``(b, H, W)`` integer masks; ``forward`` returns
    ``(b, num_classes, H, W)`` logits (:class:`~lightning_multimix.demo.models.SmallFCN`).

    Args:
        num_classes: classes of the masks, background included.
        in_channels: image channels.
        width: channels of :class:`~lightning_multimix.demo.models.SmallFCN` at half resolution.
        lr, momentum, weight_decay, nesterov, schedule, milestones, gamma: the SGD recipe, as
            :class:`~lightning_multimix.demo.classifier.ImageClassifier`'s.
        input_mix: ``None``, ``"mixup"`` or ``"cutmix"`` (see the module's docstring). Do not combine with the
            MultiMix callback.
        input_mix_alpha: ``alpha`` of ``lambda ~ Beta(alpha, alpha)``.
        seed: seeds the generator of the input mixing.

    Example:
        >>> model = SegmentationModel(num_classes=11, in_channels=1)
        >>> model(torch.zeros(2, 1, 56, 56)).shape
        torch.Size([2, 11, 56, 56])
    """

    #: the test metrics logged every validation (``val/<name>``, the demo's curves), and the one that ranks epochs
    curve_metrics: tuple[str, ...] = ("loss", "miou")
    metric = "miou"

    def __init__(
        self,
        num_classes: int = 11,
        in_channels: int = 1,
        width: int = 32,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: Optional[list[int]] = None,
        gamma: float = 0.1,
        input_mix: Optional[Literal["mixup", "cutmix"]] = None,
        input_mix_alpha: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check(isinstance(num_classes, int) and num_classes >= 2, "num_classes", num_classes, "an int >= 2")
        _check(isinstance(in_channels, int) and in_channels >= 1, "in_channels", in_channels, "an int >= 1")
        _check(isinstance(width, int) and width >= 2, "width", width, "an int >= 2")
        check_sgd("SegmentationModel", lr, momentum, weight_decay, nesterov, schedule, milestones, gamma)
        _check(input_mix is None or input_mix in SEGMENTATION_MIXES, "input_mix", input_mix,
               f"None or one of {SEGMENTATION_MIXES}")
        _check(math.isfinite(input_mix_alpha) and input_mix_alpha > 0, "input_mix_alpha", input_mix_alpha,
               "a value > 0")
        self.save_hyperparameters()
        self.network = SmallFCN(num_classes, in_channels, width)
        self.num_classes, self.input_mix, self.input_mix_alpha = num_classes, input_mix, input_mix_alpha
        self.lr, self.momentum, self.weight_decay, self.nesterov = lr, momentum, weight_decay, nesterov
        self.schedule, self.milestones, self.gamma = schedule, list(milestones or []), gamma
        self.generator = torch.Generator().manual_seed(seed)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_miou", MulticlassJaccardIndex(num_classes=num_classes, average="macro"))
        self._test_predictions: list[Tensor] = []
        self._test_masks: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    # ------------------------------------------------------------------ steps

    def on_fit_start(self) -> None:
        if self.input_mix is not None:
            from lightning_multimix.callback import MultiMix

            if any(isinstance(c, MultiMix) for c in self.trainer.callbacks):
                raise ValueError(f"SegmentationModel(input_mix={self.input_mix!r}) mixes inputs and masks itself, "
                                 "while the MultiMix callback mixes the logits: use one of the two, not both.")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, masks = batch[0], batch[1]
        targets = masks
        if self.input_mix is not None:
            draw = draw_mix(self.input_mix, images.shape[0], tuple(images.shape[-2:]), self.input_mix_alpha,
                            self.generator)
            images, targets = (mixup_segmentation(images, masks, draw, self.num_classes) if self.input_mix == "mixup"
                               else cutmix_segmentation(images, masks, draw))
        loss = F.cross_entropy(self(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, stage: str, logits: Tensor, masks: Tensor) -> Tensor:
        predictions = logits.argmax(1)
        metric = getattr(self, f"{stage}_miou")
        metric.update(predictions, masks)
        size = masks.shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits, masks), on_epoch=True, prog_bar=True, batch_size=size)
        self.log(f"{stage}/miou", metric, on_epoch=True, prog_bar=True, batch_size=size,
                 metric_attribute=f"{stage}_miou")
        return predictions

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate("val", self(batch[0]), batch[1])

    def on_test_epoch_start(self) -> None:
        self._test_predictions, self._test_masks = [], []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        predictions = self._evaluate("test", self(batch[0]), batch[1])
        self._test_predictions.append(predictions.to(torch.uint8).cpu())
        self._test_masks.append(batch[1].detach().cpu())

    def test_predictions(self) -> tuple[Tensor, Tensor]:
        """``(predicted masks (N, H, W) uint8, true masks (N, H, W))`` of the last test run on this process."""
        if not self._test_predictions:
            raise RuntimeError("SegmentationModel.test_predictions(): run trainer.test(...) first.")
        return torch.cat(self._test_predictions), torch.cat(self._test_masks)

    # ------------------------------------------------------------------ optimisation and state

    def configure_optimizers(self) -> Any:
        return configure_sgd(self, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                             nesterov=self.nesterov, schedule=self.schedule, milestones=self.milestones,
                             gamma=self.gamma)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["input_mix_generator"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "input_mix_generator" in checkpoint:
            self.generator.set_state(checkpoint["input_mix_generator"])


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"SegmentationModel: invalid `{name}={value!r}`; expected {expected}.")
