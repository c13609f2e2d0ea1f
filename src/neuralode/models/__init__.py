"""Models built on ODE solves."""

from .cnf import CNF, ConcatSquashLinear
from .deq import DEQBlock, DEQNet
from .latent_ode import GRUEncoder, LatentODE, ODERNNEncoder, RNNBaseline

__all__ = ["LatentODE", "GRUEncoder", "ODERNNEncoder", "RNNBaseline", "CNF", "ConcatSquashLinear", "DEQBlock", "DEQNet"]
