"""Fit a neural ODE to a spiral trajectory — a torchdiffeq-style program using only the odeint interface.

python examples/ode_demo.py --niters 2000 [--adjoint] [--viz] [--out runs/ode_demo]
"""

import argparse
import json
import os
import time

import torch

parser = argparse.ArgumentParser("ode demo")
parser.add_argument("--method", type=str, default="dopri5")
parser.add_argument("--data_size", type=int, default=1000)
parser.add_argument("--batch_time", type=int, default=10)
parser.add_argument("--batch_size", type=int, default=20)
parser.add_argument("--niters", type=int, default=2000)
parser.add_argument("--test_freq", type=int, default=20)
parser.add_argument("--viz", action="store_true", help="also draw the figure, ode_demo.png, in --out")
parser.add_argument("--adjoint", action="store_true")
parser.add_argument("--out", type=str, default="runs/ode_demo")


class Lambda(torch.nn.Module):
    """The true dynamics: dy/dt = y³ A."""

    def forward(self, t, y):
        return torch.mm(y**3, torch.tensor([[-0.1, 2.0], [-2.0, -0.1]]))


class ODEFunc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, mean=0, std=0.1)
                torch.nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y**3)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.adjoint:
        from neuralode import odeint_adjoint as odeint
    else:
        from neuralode import odeint
    torch.manual_seed(0)
    true_y0 = torch.tensor([[2.0, 0.0]])
    t = torch.linspace(0.0, 25.0, args.data_size)
    with torch.no_grad():
        true_y = odeint(Lambda(), true_y0, t, method="dopri5")

    def get_batch():
        s = torch.randint(0, args.data_size - args.batch_time, (args.batch_size,))
        return true_y[s], t[: args.batch_time], torch.stack([true_y[s + i] for i in range(args.batch_time)], dim=0)

    func = ODEFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    log = []
    start = time.time()
    for itr in range(1, args.niters + 1):
        optimizer.zero_grad()
        batch_y0, batch_t, batch_y = get_batch()
        pred_y = odeint(func, batch_y0, batch_t, method=args.method)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
        if itr % args.test_freq == 0 or itr == args.niters:
            with torch.no_grad():
                pred_y = odeint(func, true_y0, t)
                total = torch.mean(torch.abs(pred_y - true_y)).item()
            log.append({"iter": itr, "loss": total, "seconds": time.time() - start})
            print(f"Iter {itr:04d} | Total Loss {total:.6f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    if args.viz:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(true_y[:, 0, 0], true_y[:, 0, 1], "g-", label="true")
        ax.plot(pred_y[:, 0, 0], pred_y[:, 0, 1], "b--", label="learned")
        ax.legend()
        fig.savefig(os.path.join(args.out, "ode_demo.png"), dpi=100)
        plt.close(fig)
    return log


if __name__ == "__main__":
    main()
