"""A bouncing ball with event handling — and learning its initial height and restitution from bounce times.

Each flight is integrated with ``odeint_event`` until the ball hits the ground; the velocity is then reversed
and scaled by the coefficient of restitution. Event times are differentiable (implicit function theorem), so
the bounce times can be fitted by gradient descent. Only the torchdiffeq-style interface is used.

    python examples/bouncing_ball.py --niters 100 [--adjoint] [--viz] [--out runs/bouncing_ball]
"""

import argparse
import json
import math
import os

import torch

from neuralode import odeint, odeint_adjoint, odeint_event

parser = argparse.ArgumentParser("bouncing ball")
parser.add_argument("--niters", type=int, default=100)
parser.add_argument("--bounces", type=int, default=4)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--adjoint", action="store_true")
parser.add_argument("--viz", action="store_true", help="also draw the figure, bouncing_ball.png, in --out")
parser.add_argument("--out", type=str, default="runs/bouncing_ball")

GRAVITY = 9.81


class BouncingBall(torch.nn.Module):
    def __init__(self, height=5.0, restitution=0.6):
        super().__init__()
        self.log_height = torch.nn.Parameter(torch.tensor(math.log(height), dtype=torch.float64))
        self.logit_e = torch.nn.Parameter(torch.tensor(math.log(restitution / (1 - restitution)), dtype=torch.float64))

    def forward(self, t, state):
        pos, vel = state
        return vel, torch.full_like(vel, -GRAVITY)

    @staticmethod
    def event_fn(t, state):
        pos, _ = state
        return pos  # the ground

    def bounce_times(self, n, adjoint=False):
        t0 = torch.tensor(0.0, dtype=torch.float64)
        state = (self.log_height.exp().reshape(1), torch.zeros(1, dtype=torch.float64))
        e = torch.sigmoid(self.logit_e)
        times = []
        for _ in range(n):
            interface = odeint_adjoint if adjoint else odeint
            kwargs = {"adjoint_params": ()} if adjoint else {}
            t0, sol = odeint_event(
                self, state, t0, event_fn=self.event_fn, odeint_interface=interface, rtol=1e-9, atol=1e-10, **kwargs
            )
            times.append(t0)
            pos, vel = sol[0][-1], sol[1][-1]
            state = (pos * 0 + 1e-9, -e * vel)  # just above the ground, moving up
        return torch.stack(times)


def analytic_bounce_times(h, e, n):
    """t₁ = √(2h/g); each later flight lasts 2·v/g with v shrinking by e."""
    v = math.sqrt(2 * GRAVITY * h)
    out, t = [], v / GRAVITY
    for _ in range(n):
        out.append(t)
        v *= e
        t += 2 * v / GRAVITY
    return out


def plot(log, bounces, path):
    """The learned trajectory against the initial guess and the target bounce times, and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = analytic_bounce_times(10.0, 0.8, bounces)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, h, e, style in [
        ("initial guess", 5.0, 0.6, "C1--"),
        ("learned", log[-1]["height"], log[-1]["restitution"], "C0-"),
    ]:
        ball = BouncingBall(h, e)
        with torch.no_grad():
            state = (torch.tensor([h], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
            start = 0.0
            for k, t_hit in enumerate(ball.bounce_times(bounces).tolist()):
                ts = torch.linspace(start, t_hit, 60, dtype=torch.float64)
                pos, vel = odeint(ball, state, ts, rtol=1e-9, atol=1e-10)
                ax.plot(ts, pos[:, 0], style, label=label if k == 0 else None)
                state = (pos[-1] * 0 + 1e-9, -e * vel[-1])
                start = t_hit
    for k, t in enumerate(target):
        ax.axvline(t, color="0.6", lw=0.8, ls=":", label="target bounce times" if k == 0 else None)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("height (m)")
    ax.set_title("Bounces located by odeint_event")
    ax.legend(fontsize=8, loc="upper right")
    ax2.semilogy([r["iter"] for r in log], [r["loss"] for r in log])
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("squared error of the bounce times")
    ax2.set_title(f"height {log[-1]['height']:.2f} m (true 10), restitution {log[-1]['restitution']:.2f} (true 0.8)")
    ax2.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    target = torch.tensor(analytic_bounce_times(10.0, 0.8, args.bounces), dtype=torch.float64)
    ball = BouncingBall()
    check = ball.bounce_times(args.bounces).detach()
    expected = torch.tensor(analytic_bounce_times(5.0, 0.6, args.bounces), dtype=torch.float64)
    assert torch.allclose(check, expected, atol=1e-6), (check, expected)
    opt = torch.optim.Adam(ball.parameters(), lr=args.lr)
    log = []
    for itr in range(1, args.niters + 1):
        opt.zero_grad()
        loss = (ball.bounce_times(args.bounces, adjoint=args.adjoint) - target).pow(2).mean()
        loss.backward()
        opt.step()
        log.append(
            {
                "iter": itr,
                "loss": loss.item(),
                "height": ball.log_height.exp().item(),
                "restitution": torch.sigmoid(ball.logit_e).item(),
            }
        )
        if itr % 10 == 0 or itr == 1:
            print(
                f"Iter {itr:04d} | loss {loss.item():.3e} | height {log[-1]['height']:.3f} "
                f"| restitution {log[-1]['restitution']:.3f}"
            )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    if args.viz:
        plot(log, args.bounces, os.path.join(args.out, "bouncing_ball.png"))
    return log


if __name__ == "__main__":
    main()
