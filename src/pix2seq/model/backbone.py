"""ResNet feature extractor (torchvision), cut after ``layer2`` (stride 8), ``layer3``
(stride 16) or ``layer4`` (C5, stride 32).

``pretrained=True`` loads torchvision's ImageNet-1k weights (downloaded by torchvision on first use)
and, like DETR, freezes the stem and ``layer1``. Normalisation layers (``norm``, ``model.backbone_norm``):

- ``"auto"``: :class:`~torchvision.ops.misc.FrozenBatchNorm2d` with pretrained weights (DETR),
  trainable ``BatchNorm2d`` from scratch (the training code may turn it into SyncBatchNorm);
- ``"batch"``: trainable ``BatchNorm2d``; ``"frozen"``: ``FrozenBatchNorm2d`` (fixed statistics);
- ``"group"``: ``GroupNorm`` (32 groups), independent of the batch; with pretrained weights it
  starts from the BatchNorm affine parameters.

The max-pool of the stem is kept (removing it quadruples the token count and halves throughput).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

# output channels of (layer2, layer3, layer4) for each supported ResNet
_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
}
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class Backbone(nn.Module):
    """``(B, 3, H, W)`` normalised float images -> ``(B, num_channels, H/stride, W/stride)`` features."""

    def __init__(
        self, name: str = "resnet50", stage: str = "layer4", pretrained: bool = False, norm: str = "auto"
    ) -> None:
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"model.backbone: unknown backbone {name!r} (known: {sorted(_CHANNELS)})")
        if stage not in _STAGES[1:]:
            raise ValueError(f"model.backbone_stage: must be layer2, layer3 or layer4, got {stage!r}")
        if norm not in ("auto", "batch", "frozen", "group"):
            raise ValueError(f"model.backbone_norm: must be auto, batch, frozen or group, got {norm!r}")
        if norm == "auto":
            norm = "frozen" if pretrained else "batch"
        ctor = getattr(torchvision.models, name)
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1 if pretrained else None
        if norm == "frozen":
            net = ctor(weights=weights, norm_layer=FrozenBatchNorm2d)
        else:
            net = ctor(weights=weights)
            if norm == "group":
                _batch_to_group_norm(net)
        last = _STAGES.index(stage)
        modules: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool
        )
        for s in _STAGES[: last + 1]:
            modules[s] = getattr(net, s)
        self.body = nn.Sequential(modules)
        if pretrained:  # DETR: the stem and layer1 stay at their ImageNet values
            for n, p in self.body.named_parameters():
                if not n.startswith(("layer2", "layer3", "layer4")):
                    p.requires_grad_(False)
        self.name = name
        self.stage = stage
        self.pretrained = pretrained
        self.norm = norm
        self.num_channels = _CHANNELS[name][last - 1]
        self.stride = 2 ** (last + 2)  # layer2: 8, layer3: 16, layer4: 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _batch_to_group_norm(module: nn.Module, groups: int = 32) -> None:
    """Replace every ``BatchNorm2d`` by ``GroupNorm`` in place, keeping the affine parameters."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(math.gcd(groups, child.num_features), child.num_features, eps=child.eps)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            _batch_to_group_norm(child, groups)
