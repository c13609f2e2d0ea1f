"""Models built on ODE solves."""

from .classifier import DEQNet, ODENet, ResNet, RKNet
from .cnf import CNF, ConcatSquashLinear, PlanarCNFNet
from .deq import DEQBlock
from .latent_ode import GRUEncoder, LatentODE, ODERNNEncoder, RNNBaseline
from .planar import PlanarFlow

__all__ = [
    "LatentODE",
    "GRUEncoder",
    "ODERNNEncoder",
    "RNNBaseline",
    "CNF",
    "ConcatSquashLinear",
    "PlanarCNFNet",
    "DEQBlock",
    "DEQNet",
    "ODENet",
    "ResNet",
    "RKNet",
    "PlanarFlow",
]
