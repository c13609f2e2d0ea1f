"""Layers: the ODE block (a drop-in for a stack of residual blocks) and time-dependent layers."""

from .block import ODEBlock
from .layers import ConcatConv2d, ConcatLinear, ConvODEFunc, MLPODEFunc
from .regularizers import RegularizedField

__all__ = ["ODEBlock", "ConcatConv2d", "ConcatLinear", "ConvODEFunc", "MLPODEFunc", "RegularizedField"]
