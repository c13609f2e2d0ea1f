"""Models built on ODE solves."""

from .cnf import CNF, ConcatSquashLinear, PlanarCNFNet
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
    "PlanarCNFNet",
    "DEQBlock",
    "DEQNet",
    "PlanarFlow",
]
