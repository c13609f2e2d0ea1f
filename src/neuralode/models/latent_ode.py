"""The latent ODE for irregularly sampled time series (Chen et al. 2018, §5; Rubanova et al. 2019).

A recognition network reads the observations backwards in time and gives q(z0) = N(μ, σ²); a latent ODE
carries z0 to every requested time; a decoder maps latents to observations. Training maximises the ELBO

    E_q[ Σ_observed log N(x_i | dec(z(t_i)), σ_obs²) ] - KL(q(z0) || N(0, I)).

Sequences in a batch may be observed at different times: the batch is solved once on the union of its
times, and a mask says which (time, sequence) entries each sequence observed; nothing unobserved enters the
loss or the encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._api import solve

__all__ = ["LatentODE", "RNNBaseline", "GRUEncoder", "ODERNNEncoder"]


def _mlp(i: int, hidden: int, o: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(i, hidden), nn.ELU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ELU()]
    mods.append(nn.Linear(hidden, o))
    return nn.Sequential(*mods)


class _Field(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = _mlp(dim, hidden, dim)

    def forward(self, t, z):
        return self.net(z)


class GRUEncoder(nn.Module):
    """A GRU over (observation, mask, time gap) pairs, run from the last time to the first.

    Entries a sequence did not observe leave its hidden state unchanged (the mask gates the update), so the
    encoding depends only on what was observed and on the gaps between observations."""

    def __init__(self, obs_dim: int, latent_dim: int, hidden: int = 25) -> None:
        super().__init__()
        self.cell = nn.GRUCell(2 * obs_dim + 1, hidden)
        self.out = nn.Linear(hidden, 2 * latent_dim)
        self.hidden = hidden

    def evolve(self, h: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        """The hidden state carried from ``t_from`` to ``t_to`` between observations: unchanged for the GRU.

        Arguments:
            h: hidden states ``(B, hidden)``.
            t_from, t_to: 0-d tensors, the later and the earlier time (the encoder runs backwards).

        Returns:
            ``(B, hidden)``: ``h`` itself (:class:`ODERNNEncoder` solves an ODE here instead).
        """
        return h

    def forward(self, t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` (T,) increasing, ``x`` (T, B, D), ``mask`` (T, B, D) → (mean, log variance) of q(z0)."""
        T, B, _ = x.shape
        h = x.new_zeros(B, self.hidden)
        last_t = torch.full((B,), float(t[-1]), dtype=x.dtype, device=x.device)
        for i in range(T - 1, -1, -1):
            seen = mask[i].any(-1)  # (B,)
            gap = (last_t - t[i]).unsqueeze(-1)
            h_prop = self.evolve(h, t[i + 1] if i + 1 < T else t[i], t[i])
            inp = torch.cat([x[i] * mask[i], mask[i], gap], -1)
            h_new = self.cell(inp, h_prop)
            h = torch.where(seen[:, None], h_new, h_prop)
            last_t = torch.where(seen, t[i].expand(B), last_t)
        mean, logvar = self.out(h).chunk(2, -1)
        return mean, logvar


class ODERNNEncoder(GRUEncoder):
    """The ODE-RNN of Rubanova et al. (2019): between observations the hidden state follows an ODE (solved
    backwards in time), at observations the GRU updates it."""

    def __init__(self, obs_dim: int, latent_dim: int, hidden: int = 25, ode_hidden: int = 25) -> None:
        super().__init__(obs_dim, latent_dim, hidden)
        self.field = _Field(hidden, ode_hidden)

    def evolve(self, h: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
        """The hidden state solved from ``t_from`` to ``t_to`` by its ODE (two Euler steps, as in the paper).

        Arguments:
            h: hidden states ``(B, hidden)``.
            t_from, t_to: 0-d tensors, the later and the earlier time (the encoder runs backwards).

        Returns:
            ``(B, hidden)``, ``h``'s dtype; ``h`` itself when the two times are equal.
        """
        if float(t_from) == float(t_to):
            return h
        ts = torch.stack([t_from, t_to]).to(h.dtype)
        return solve(
            self.field, h, ts, method="euler", options={"step_size": float(t_from - t_to) / 2}, dense=False
        ).ys[-1]


class LatentODE(nn.Module):
    """Recognition network → q(z0) → latent ODE → decoder.

    Arguments:
        obs_dim, latent_dim: sizes of observations and latents.
        encoder: ``"gru"`` or ``"odernn"``.
        method, rtol, atol, gradient: how the latent ODE is solved and differentiated.
    """

    def __init__(
        self,
        obs_dim: int = 2,
        latent_dim: int = 4,
        hidden: int = 25,
        field_hidden: int = 20,
        encoder: str = "gru",
        method: str = "dopri5",
        rtol: float = 1e-4,
        atol: float = 1e-5,
        gradient: str = "backprop",
    ) -> None:
        super().__init__()
        if encoder not in ("gru", "odernn"):
            raise ValueError(f"`encoder` must be 'gru' or 'odernn', got {encoder!r}")
        self.encoder = (
            GRUEncoder(obs_dim, latent_dim, hidden) if encoder == "gru" else ODERNNEncoder(obs_dim, latent_dim, hidden)
        )
        self.field = _Field(latent_dim, field_hidden)
        self.decoder = _mlp(latent_dim, field_hidden, obs_dim, layers=1)
        self.method, self.rtol, self.atol, self.gradient = method, rtol, atol, gradient
        self.last_stats = None

    def decode(self, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Observations predicted at times ``t`` (T,) from latents ``z0`` (B, L): (T, B, D)."""
        sol = solve(
            self.field,
            z0,
            t - t[0],
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            gradient=self.gradient,
            dense=False,
        )
        self.last_stats = sol.stats
        return self.decoder(sol.ys)

    def elbo(
        self, t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, noise_std: float = 0.1, kl_weight: float = 1.0
    ) -> tuple[torch.Tensor, dict]:
        """Mean over sequences of the ELBO (per sequence, summed over its observed entries)."""
        mean, logvar = self.encoder(t, x, mask)
        z0 = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        pred = self.decode(z0, t)
        logpx = _gaussian_loglik(x, pred, noise_std, mask)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        elbo = (logpx - kl_weight * kl).mean()
        return elbo, {"logpx": float(logpx.detach().mean()), "kl": float(kl.detach().mean())}

    @torch.no_grad()
    def predict(self, t_obs: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, t_query: torch.Tensor) -> torch.Tensor:
        """Posterior-mean prediction at ``t_query`` (starting at the first observed time) from observations."""
        mean, _ = self.encoder(t_obs, x, mask)
        return self.decode(mean, t_query)


class RNNBaseline(nn.Module):
    """A GRU with time gaps as input (the paper's RNN baseline, Chen et al. 2018 §5.1), read forwards in time.

    At each of a sequence's observations the state takes (x_i, t_i - t_prev), the time difference being the
    extra input that lets an RNN handle irregular sampling; a head predicts the observation at any later time
    τ from the state and the gap τ - t_last. Training is one-step-ahead prediction of the observed entries
    (teacher forcing). Prediction past the last observation is autoregressive: predicted values are fed back
    as if observed, at every query time or, with ``feedback_gap``, only once that much time has passed since the
    last value the RNN read; the query times in between are predicted from the state and the gap, as inside the
    observed window. Rolling forward at the gaps it was trained on matters: an RNN trained on 30 of 100 times
    sees gaps of about 0.33, and fed back every 0.1 it advances too far per step. What a sequence did not
    observe never enters its state.
    """

    def __init__(self, obs_dim: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.cell = nn.GRUCell(obs_dim + 1, hidden)
        self.head = _mlp(hidden + 1, hidden, obs_dim, layers=1)
        self.hidden = hidden

    def forward(
        self,
        t: torch.Tensor,
        x: torch.Tensor,
        mask: torch.Tensor,
        autoregressive: bool = False,
        feedback_gap: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions at every time of ``t`` (T,) made before reading that time's observation: (T, B, D), and
        whether an earlier observation existed to predict from: (T, B). With ``autoregressive``, times after a
        sequence's last observation at least ``feedback_gap`` after the last value read are fed its own
        prediction."""
        T, B, _ = x.shape
        h = x.new_zeros(B, self.hidden)
        last_t = torch.full((B,), float(t[0]), dtype=x.dtype, device=x.device)
        have = torch.zeros(B, dtype=torch.bool, device=x.device)
        seen_all = mask.any(-1)  # (T, B)
        # index of each sequence's last observation; later times are extrapolation
        idx = torch.arange(T, device=x.device)[:, None].expand(T, B)
        last_obs = torch.where(seen_all, idx, torch.full_like(idx, -1)).amax(0)
        preds, valid = [], []
        for i in range(T):
            gap = (t[i] - last_t).unsqueeze(-1)
            pred = self.head(torch.cat([h, gap], -1))
            preds.append(pred)
            valid.append(have.clone())
            seen = seen_all[i]
            update = seen | (autoregressive & have & (i > last_obs) & (gap[:, 0] >= feedback_gap))
            value = torch.where(seen[:, None], x[i], pred)
            h_new = self.cell(torch.cat([value, gap], -1), h)
            h = torch.where(update[:, None], h_new, h)
            last_t = torch.where(update, t[i].expand(B), last_t)
            have = have | seen
        return torch.stack(preds), torch.stack(valid)

    def inputs(self, t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's observations packed to the front, in time order: the GRU's inputs (K, B, D + 1),
        ``[x_i, t_i - t_prev]`` with ``t_prev`` the sequence's previous observation time (``t[0]`` before the
        first), and the packed mask (K, B, D); K is the largest number of observations in the batch and rows
        past a sequence's own count are zero."""
        T = x.shape[0]
        seen = mask.any(-1)  # (T, B)
        count = seen.sum(0)
        k_max = max(int(count.max()), 1)
        idx = torch.arange(T, device=x.device)[:, None]
        # observed times first, each group in time order (argsort of a key without ties)
        order = torch.where(seen, idx, idx + T).argsort(0)[:k_max]  # (K, B)
        real = torch.arange(k_max, device=x.device)[:, None] < count[None]  # (K, B)
        ts = t[order]
        prev = torch.cat([t[:1].expand(1, ts.shape[1]), ts[:-1]])
        gap = torch.where(real, ts - prev, torch.zeros_like(ts))
        xs = torch.where(real[..., None], x.gather(0, order[..., None].expand(-1, -1, x.shape[-1])), 0.0)
        ms = mask.gather(0, order[..., None].expand(-1, -1, mask.shape[-1])) * real[..., None]
        return torch.cat([xs, gap[..., None]], -1), ms

    def loss(self, t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the one-step-ahead predictions at observed entries.

        Equal to the loss of :meth:`forward`'s predictions, but the GRU steps over each sequence's observations
        only (packed to the front) instead of over the batch's union of times: with n of 100 times observed
        the RNN takes n steps, as an RNN reading the sequence would, so its wall time is not inflated."""
        inp, ms = self.inputs(t, x, mask)
        D = x.shape[-1]
        h = x.new_zeros(x.shape[1], self.hidden)
        states = []
        for k in range(inp.shape[0]):  # rows past a sequence's count come after all its real ones: no gating
            states.append(h)
            h = self.cell(inp[k], h)
        # prediction of observation k from the state after k - 1 and the gap to it; the first has no predecessor
        pred = self.head(torch.cat([torch.stack(states), inp[..., D:]], -1))
        m = ms.clone()
        m[0] = 0
        return ((pred - inp[..., :D]) ** 2 * m).sum() / m.sum().clamp_min(1)

    @torch.no_grad()
    def predict(self, t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, feedback_gap: float = 0.0) -> torch.Tensor:
        """Predictions at every time of ``t``: between observations from the state after the last one, past
        the last observation autoregressively (its predictions read back no more often than every
        ``feedback_gap``)."""
        return self.forward(t, x, mask, autoregressive=True, feedback_gap=feedback_gap)[0]


def _gaussian_loglik(x, pred, std, mask) -> torch.Tensor:
    ll = -0.5 * (((x - pred) / std) ** 2 + 2 * math.log(std) + math.log(2 * math.pi))
    return (ll * mask).sum((0, 2))
