"""Models built on ODE solves."""

from .cnf import CNF, ConcatSquashLinear
from .deq import DEQBlock, DEQNet
from .latent_ode import GRUEncoder, LatentODE, ODERNNEncoder, RNNBaseline
from .planar import PlanarFlow

__all__ = [
    "LatentODE",
    "GRUEncoder",
    "ODERNNEncoder",
    "RNNBaseline",
    "CNF",
    "ConcatSquashLinear",
    "DEQBlock",
    "DEQNet",
    "PlanarFlow",
]
