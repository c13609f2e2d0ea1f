"""Models built on ODE solves."""

from .latent_ode import GRUEncoder, LatentODE, ODERNNEncoder, RNNBaseline

__all__ = ["LatentODE", "GRUEncoder", "ODERNNEncoder", "RNNBaseline"]
