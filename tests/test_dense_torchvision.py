"""Dense MultiMix on torchvision's models with one callback line: the feature map and head found in CNNs, MLP
classifiers and ViTs, and the clear errors where the named head does not read the pooled map (skipped without
torchvision).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_multimix.step as step_module
from lightning_multimix import Dense, MultiMix, MultiMixError
from helpers_models import Classifier, Recording, loader, quiet_trainer

models = pytest.importorskip("torchvision.models")


def tiny_vit(**kwargs) -> nn.Module:
    return models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10, **kwargs
    )


@pytest.mark.parametrize(
    "build, size, spec, positions, head",
    [
        (lambda: models.resnet18(num_classes=10), 32, ("net.avgpool", "input"), 1, None),
        (lambda: models.resnet18(num_classes=10), 64, ("net.avgpool", "input"), 4, None),
        (tiny_vit, 32, ("net.encoder", "vit"), 16, None),
        # MLP / dropout classifiers: the head found for dense mode is the whole classifier, which takes the pooled
        # embedding (EfficientNet's in-place Dropout must not corrupt the captured input)
        (lambda: models.mobilenet_v3_small(num_classes=10), 64, ("net.avgpool", "input"), 4, None),
        (lambda: models.efficientnet_b0(num_classes=10), 64, ("net.avgpool", "input"), 4, None),
        (lambda: models.mobilenet_v3_small(num_classes=10), 64, ("net.avgpool", "input"), 4, "net.classifier"),
    ],
    ids=["resnet18-32px", "resnet18-64px", "vit", "mobilenet_v3_small", "efficientnet_b0", "mobilenet-head-arg"],
)
def test_torchvision_dense(build, size, spec, positions, head, monkeypatch):
    shapes = []
    objective = step_module.multimix_objective

    def recording(*args, **kwargs):
        shapes.append(tuple(kwargs["feature_map"].shape))
        return objective(*args, **kwargs)

    monkeypatch.setattr(step_module, "multimix_objective", recording)
    torch.manual_seed(0)
    module = Classifier(build(), lr=0.01)
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    callback = Recording(dense=Dense(), n_tuples=16, seed=0, head=head)
    before = {k: p.detach().clone() for k, p in module.named_parameters()}
    quiet_trainer([callback], max_steps=2).fit(module, loader(x, y, batch_size=4))
    assert callback.feature_map_spec == spec
    assert callback.head_path == head or (head is None and callback.head_path in ("net.fc", "net.heads.head",
                                                                                    "net.classifier"))
    assert len(shapes) == 2 and shapes[0][:2] == (4, positions)
    assert len(callback.losses) == 2 and all(torch.isfinite(loss) for loss in callback.losses)
    first = next(iter(before))
    assert not torch.equal(before[first], dict(module.named_parameters())[first])  # the encoder learned


def test_feature_map_behind_an_mlp_with_the_last_linear_as_head_is_a_clear_error():
    """Naming the last Linear of MobileNet's MLP classifier as head: its input is not the pooled map; no silent
    fallback, an error saying what to do."""
    module = Classifier(models.mobilenet_v3_small(num_classes=10))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    callback = MultiMix(dense=Dense(), n_tuples=4, head="net.classifier.3")
    with pytest.raises(MultiMixError, match=r"net.avgpool.*name as head the module that takes the pooled embedding"):
        quiet_trainer([callback], max_steps=1).fit(module, loader(x, y, batch_size=4))


def test_vit_with_pre_logits_uses_the_whole_heads_block():
    module = Classifier(tiny_vit(representation_size=16))  # heads = pre_logits -> tanh -> head
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    callback = MultiMix(dense=Dense(), n_tuples=4)
    quiet_trainer([callback], max_steps=1).fit(module, loader(x, y, batch_size=4))
    assert callback.head_path == "net.heads"


def test_vit_head_not_fed_by_the_class_token_is_a_clear_error():
    module = Classifier(tiny_vit(representation_size=16))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    callback = MultiMix(dense=Dense(), n_tuples=4, head="net.heads.head")
    with pytest.raises(MultiMixError, match="through its class token"):
        quiet_trainer([callback], max_steps=1).fit(module, loader(x, y, batch_size=4))
