"""Time-dependent layers (time concatenated as a channel or a feature) and the ODE-Net's dynamics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConcatConv2d", "ConcatLinear", "ConvODEFunc", "MLPODEFunc"]


def _time_like(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of ``x``'s dtype and device that broadcasts against ``x``: a scalar time, or one time per
    sample (``solve(..., per_sample=True)`` passes a ``(batch,)`` tensor) shaped ``(batch, 1, ...)``."""
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if tt.ndim == 1 and x.ndim > 1 and tt.shape[0] == x.shape[0]:
        tt = tt.view(-1, *([1] * (x.ndim - 1)))
    return tt


class ConcatConv2d(nn.Module):
    """A convolution that sees time as one more input channel filled with ``t``.

    The parameters are those of ``nn.Conv2d(in_channels + 1, out_channels)`` (the last input channel is time),
    but the time channel is never materialised: convolving a constant channel ``t`` is ``t`` times the
    convolution of a channel of ones (which differs from a constant only at zero-padded borders), a small
    ``(out_channels, H', W')`` map added to the convolution of ``x``. That saves a concatenated copy of the
    input per call, in time and in the memory autograd keeps.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, stride, padding, bias=bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``[x, t]``.

        Arguments:
            t: the time: a 0-d tensor (or a number), or ``(batch,)`` with one time per sample.
            x: ``(batch, in_channels, H, W)``, a floating dtype.

        Returns:
            ``(batch, out_channels, H', W')`` in ``x``'s dtype.
        """
        conv = self.conv
        w = conv.weight
        out = F.conv2d(x, w[:, :-1], conv.bias, conv.stride, conv.padding)
        ones = x.new_ones(1, 1, *x.shape[2:])
        tmap = F.conv2d(ones, w[:, -1:], None, conv.stride, conv.padding)
        return out.add_(tmap * _time_like(t, x))


class ConcatLinear(nn.Module):
    """A linear layer that sees time as one more input feature: ``Linear(in_features + 1, out_features)``
    applied to ``[x, t]``.

    Example:
        >>> layer = ConcatLinear(3, 5)
        >>> layer(torch.tensor(0.5), torch.randn(8, 3)).shape
        torch.Size([8, 5])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``[x, t]``.

        Arguments:
            t: the time: a 0-d tensor (or a number), or ``(batch,)`` with one time per sample.
            x: ``(..., in_features)``, a floating dtype.

        Returns:
            ``(..., out_features)`` in ``x``'s dtype.
        """
        return self.linear(torch.cat([x, _time_like(t, x).expand(*x.shape[:-1], 1)], -1))


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ConvODEFunc(nn.Module):
    """The ODE-Net dynamics of Chen et al. (2018, §3): GroupNorm → ReLU → time-concat 3×3 conv, twice, then a
    last GroupNorm. Shape-preserving on ``(batch, channels, height, width)``."""

    def __init__(self, channels: int = 64, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = _group_norm(channels, groups)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = _group_norm(channels, groups)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = _group_norm(channels, groups)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``dx/dt`` at ``(t, x)``.

        Arguments:
            t: the time (0-d, or ``(batch,)`` per sample).
            x: ``(batch, channels, H, W)``.

        Returns:
            ``dx/dt``, shaped like ``x``.
        """
        # in-place ReLU on GroupNorm outputs: GroupNorm's backward reads its input, not its output, so
        # autograd keeps one tensor fewer per activation
        out = self.conv1(t, torch.relu_(self.norm1(x)))
        out = self.conv2(t, torch.relu_(self.norm2(out)))
        return self.norm3(out)


class MLPODEFunc(nn.Module):
    """dh/dt = MLP([h, t]) with tanh hidden layers: a small time-dependent dynamics for vectors.

    Arguments:
        dim: the state's size (the last dimension of ``h``).
        hidden: width of the hidden layers.
        layers: number of hidden layers (each a :class:`ConcatLinear` and tanh).

    Example:
        >>> f = MLPODEFunc(2, hidden=16)
        >>> f(torch.tensor(0.0), torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.inp = ConcatLinear(dim, hidden)
        self.hidden = nn.ModuleList(ConcatLinear(hidden, hidden) for _ in range(layers - 1))
        self.out = ConcatLinear(hidden, dim)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``dh/dt`` at ``(t, h)``.

        Arguments:
            t: the time (0-d, or ``(batch,)`` per sample).
            h: ``(..., dim)``, a floating dtype.

        Returns:
            ``dh/dt``, shaped like ``h``.
        """
        h = torch.tanh(self.inp(t, h))
        for layer in self.hidden:
            h = torch.tanh(layer(t, h))
        return self.out(t, h)
