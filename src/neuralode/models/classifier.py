"""Image classifiers of Chen et al. (2018, §3, Table 1): one downsampling stem and one head, with

- ``ODENet``: a single ODE block with the GroupNorm dynamics of ``ConvODEFunc`` (adjoint gradients by default);
- ``ResNet``: six residual blocks (pre-activation: GroupNorm → ReLU → conv, twice);
- ``RKNet``: the ODE-Net's dynamics integrated on a fixed grid by an RK method, differentiated by backprop;
- ``DEQNet``: one deep-equilibrium block (``models.deq``) with implicit gradients.

With 64 channels the paper's architecture gives about 0.21M parameters for the ODE-Net and RK-Net and 0.58M for
the ResNet (``count_parameters``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import ConvODEFunc, ODEBlock

__all__ = [
    "Stem",
    "Head",
    "ResBlock",
    "ODENet",
    "ResNet",
    "RKNet",
    "build_classifier",
    "count_parameters",
    "CLASSIFIERS",
]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class Stem(nn.Sequential):
    """Downsampling: 3×3 conv to ``channels``, then two 4×4 stride-2 convs (28×28 → 7×7, 8×8 → 2×2)."""

    def __init__(self, in_channels: int = 1, channels: int = 64) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, 1, 1),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 4, 2, 1),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 4, 2, 1),
        )


class Head(nn.Sequential):
    """GroupNorm → ReLU → global average pool → linear to class logits."""

    def __init__(self, channels: int = 64, classes: int = 10) -> None:
        super().__init__(
            _norm(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)
        )


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(norm(conv(relu(norm(x))))))."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.norm1 = _norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu_(self.norm1(x)))  # in place, as in the ODE-Net's dynamics
        out = self.conv2(torch.relu_(self.norm2(out)))
        return x + out


class _Classifier(nn.Module):
    def __init__(self, body: nn.Module, in_channels: int, channels: int, classes: int) -> None:
        super().__init__()
        self.stem = Stem(in_channels, channels)
        self.body = body
        self.head = Head(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))

    def nfe(self) -> tuple[int, int]:
        """(forward, backward) function evaluations of the last pass; (0, 0) for a network without an ODE."""
        if isinstance(self.body, ODEBlock):
            return self.body.nfe_forward, self.body.nfe_backward
        return 0, 0

    def extra_loss(self) -> torch.Tensor | None:
        """The ODE block's regularisation term of the last training pass (None without regularisers)."""
        return getattr(self.body, "reg_loss", None)


class ODENet(_Classifier):
    """Stem → one ODE block on [0, 1] (dopri5, rtol = atol = 1e-3, adjoint gradients as in the paper) → head.
    ``regularization={"kinetic": w, "jacobian": w}`` adds Finlay et al.'s regularisers (``extra_loss``)."""

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        channels: int = 64,
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        gradient: str = "adjoint",
        options: dict | None = None,
        regularization: dict | None = None,
    ) -> None:
        block = ODEBlock(
            ConvODEFunc(channels),
            method=method,
            rtol=rtol,
            atol=atol,
            gradient=gradient,
            options=options,
            regularization=regularization,
        )
        super().__init__(block, in_channels, channels, classes)


class RKNet(_Classifier):
    """Stem → the ODE-Net's dynamics integrated by a fixed-grid RK method (``steps`` equal steps on [0, 1],
    rk4 by default), differentiated by backprop through the steps → head."""

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        channels: int = 64,
        *,
        method: str = "rk4",
        steps: int = 2,
        gradient: str = "backprop",
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        block = ODEBlock(ConvODEFunc(channels), method=method, options={"step_size": 1.0 / steps}, gradient=gradient)
        super().__init__(block, in_channels, channels, classes)


class ResNet(_Classifier):
    """Stem → ``blocks`` residual blocks (six in the paper) → head."""

    def __init__(self, in_channels: int = 1, classes: int = 10, channels: int = 64, *, blocks: int = 6) -> None:
        super().__init__(nn.Sequential(*(ResBlock(channels) for _ in range(blocks))), in_channels, channels, classes)


def DEQNet(*args, **kwargs) -> nn.Module:  # noqa: N802 - a constructor, imported lazily (deq imports Stem/Head)
    """Stem → one deep-equilibrium block (``models.deq``) → head."""
    from .deq import DEQNet as _DEQNet

    return _DEQNet(*args, **kwargs)


CLASSIFIERS = {"odenet": ODENet, "resnet": ResNet, "rknet": RKNet, "deq": DEQNet}


def build_classifier(kind: str, in_channels: int = 1, classes: int = 10, channels: int = 64, **kwargs) -> nn.Module:
    """One of ``CLASSIFIERS`` by name; ``kwargs`` go to its constructor (solver settings for the ODE-Net)."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"model={kind!r} is not known; choose one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[kind](in_channels, classes, channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
