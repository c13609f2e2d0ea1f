"""Image classifiers of Chen et al. (2018, §3, Table 1): one downsampling stem and one head, with

- ``ODENet``: a single ODE block with the GroupNorm dynamics of ``ConvODEFunc`` (adjoint gradients by default);
- ``ResNet``: six residual blocks (pre-activation: GroupNorm → ReLU → conv, twice);
- ``RKNet``: the ODE-Net's dynamics integrated on a fixed grid by an RK method, differentiated by backprop;
- ``DEQNet``: one deep-equilibrium block (``models.deq.DEQBlock``) with implicit gradients.

With 64 channels the paper's architecture gives about 0.21M parameters for the ODE-Net and RK-Net and 0.58M for
the ResNet (``count_parameters``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import ConvODEFunc, ODEBlock
from .deq import DEQBlock, DEQConvCell

__all__ = [
    "Stem",
    "Head",
    "ResBlock",
    "ODENet",
    "ResNet",
    "RKNet",
    "DEQNet",
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
    """The ODE-Net of Chen et al. (2018, §3): stem → one ODE block on [0, 1] → head.

    Arguments:
        in_channels, classes, channels: input channels, number of classes, width of the ODE block.
        method, rtol, atol, options: the block's solve (dopri5 at 1e-3 as in the paper; see ``neuralode.solve``).
        gradient: ``"adjoint"`` (the paper's), ``"backprop"`` or ``"checkpoint"``.
        regularization: ``{"kinetic": w, "jacobian": w}`` adds Finlay et al.'s (2020) regularisers, read back by
            ``extra_loss()``.

    Calling it on ``(batch, in_channels, H, W)`` images gives ``(batch, classes)`` logits; ``nfe()`` returns the
    forward and backward evaluations of the last training step.

    Example:
        ```python
        import torch
        from neuralode.models import ODENet

        logits = ODENet(in_channels=1, classes=10, channels=8)(torch.randn(2, 1, 8, 8))
        assert logits.shape == (2, 10)
        ```
    """

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
    """The RK-Net baseline of Chen et al. (2018, Table 1): the ODE-Net's dynamics integrated on a fixed grid.

    Arguments:
        in_channels, classes, channels: as for :class:`ODENet`.
        method: a fixed-step method (``"rk4"`` by default).
        steps: equal steps on [0, 1], at least 1.
        gradient: ``"backprop"`` through the steps (the paper's RK-Net), or another gradient mode.

    Maps ``(batch, in_channels, H, W)`` images to ``(batch, classes)`` logits.
    """

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
    """The ResNet baseline of Chen et al. (2018, Table 1): stem → residual blocks → head.

    Arguments:
        in_channels, classes, channels: as for :class:`ODENet`.
        blocks: pre-activation residual blocks (six in the paper).

    Maps ``(batch, in_channels, H, W)`` images to ``(batch, classes)`` logits.
    """

    def __init__(self, in_channels: int = 1, classes: int = 10, channels: int = 64, *, blocks: int = 6) -> None:
        super().__init__(nn.Sequential(*(ResBlock(channels) for _ in range(blocks))), in_channels, channels, classes)


class DEQNet(nn.Module):
    """The ODE-Net's stem and head around one equilibrium block: an image
    classifier whose middle is a :class:`DEQBlock` over :class:`DEQConvCell`.

    Arguments:
        in_channels, classes, channels: input channels, number of classes, width of the block.
        solver, tol, max_iter, jac_reg, on_failure: the block's fixed-point solve (see :class:`DEQBlock`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 10,
        channels: int = 64,
        *,
        solver: str = "anderson",
        tol: float = 1e-3,
        max_iter: int = 30,
        jac_reg: float = 0.0,
        on_failure: str = "ignore",
    ) -> None:
        super().__init__()
        self.stem = Stem(in_channels, channels)
        # training reads the residuals from ``body.stats`` rather than a warning per batch
        self.body = DEQBlock(
            DEQConvCell(channels), solver=solver, tol=tol, max_iter=max_iter, jac_reg=jac_reg, on_failure=on_failure
        )
        self.head = Head(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images.

        Arguments:
            x: ``(batch, in_channels, H, W)``, a floating dtype (e.g. 28×28 digits).

        Returns:
            ``(batch, classes)`` logits.
        """
        return self.head(self.body(self.stem(x)))

    def nfe(self) -> tuple[int, int]:
        """``(forward, backward)`` evaluations of the equilibrium block in the last training step."""
        return self.body.nfe_forward, self.body.nfe_backward

    def extra_loss(self) -> torch.Tensor | None:
        """The Jacobian regulariser of the last training forward pass (``None`` when ``jac_reg`` is 0)."""
        return self.body.extra_loss


CLASSIFIERS = {"odenet": ODENet, "resnet": ResNet, "rknet": RKNet, "deq": DEQNet}


def build_classifier(kind: str, in_channels: int = 1, classes: int = 10, channels: int = 64, **kwargs) -> nn.Module:
    """One of ``CLASSIFIERS`` by name; ``kwargs`` go to its constructor (solver settings for the ODE-Net)."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"model={kind!r} is not known; choose one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[kind](in_channels, classes, channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
