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
``pool="same"`` (``model.stem_pool``) pads it as TensorFlow's ``SAME`` does (the official ResNet):
PyTorch's ``MaxPool2d(3, 2, padding=1)`` pads one cell on every side, SAME pads ``0`` before and ``1``
after an even side (``1``/``1`` for an odd one), so on even inputs every window moves by one
pixel. Both give ``ceil(n / 2)`` outputs. The strided convolutions need nothing: the official
``Conv2dFixedPadding`` pads ``(k - 1) // 2`` before and the rest after, which for the odd kernels
of a ResNet (7, 3, 1) is PyTorch's symmetric ``padding=k // 2``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
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
        self,
        name: str = "resnet50",
        stage: str = "layer4",
        pretrained: bool = False,
        norm: str = "auto",
        pool: str = "torch",
    ) -> None:
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"model.backbone: unknown backbone {name!r} (known: {sorted(_CHANNELS)})")
        if stage not in _STAGES[1:]:
            raise ValueError(f"model.backbone_stage: must be layer2, layer3 or layer4, got {stage!r}")
        if norm not in ("auto", "batch", "frozen", "group"):
            raise ValueError(f"model.backbone_norm: must be auto, batch, frozen or group, got {norm!r}")
        if pool not in ("torch", "same"):
            raise ValueError(f"model.stem_pool: must be torch or same, got {pool!r}")
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
            conv1=net.conv1,
            bn1=net.bn1,
            relu=net.relu,
            maxpool=net.maxpool if pool == "torch" else SameMaxPool2d(),
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


class SameMaxPool2d(nn.Module):
    """``kernel x kernel`` max-pool with stride ``stride`` and TensorFlow's ``SAME`` padding.

    Output side ``ceil(n / stride)``; the padding ``max((out - 1) * stride + kernel - n, 0)`` is split
    ``total // 2`` before, the rest after; padded cells never win (-inf).
    """

    def __init__(self, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pad(self, n: int) -> tuple[int, int]:
        total = max((-(-n // self.stride) - 1) * self.stride + self.kernel - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = self._pad(x.shape[-2])
        left, right = self._pad(x.shape[-1])
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding=SAME"


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
