"""Make the examples gallery's figures: run each script under examples/ with ``--viz`` and keep its PNG.

    OMP_NUM_THREADS=1 python docs/gallery/make_figures.py            # all six, a few minutes on one core
    OMP_NUM_THREADS=1 python docs/gallery/make_figures.py cnf        # one of them

Each script draws its own figure (``--viz`` writes ``<name>.png`` into ``--out``); this runs it with its
defaults in a temporary folder and copies the PNG next to this file. The PNGs are committed, so the
documentation build does not train anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, os.pardir, os.pardir, "examples")
NAMES = ["ode_demo", "bouncing_ball", "hybrid_ball", "learn_physics", "latent_ode", "cnf"]


def main(names):
    for name in names or NAMES:
        if name not in NAMES:
            raise SystemExit(f"unknown example {name!r}; choose from {NAMES}")
        with tempfile.TemporaryDirectory() as out:
            start = time.time()
            script = os.path.join(EXAMPLES, f"{name}.py")
            subprocess.run([sys.executable, script, "--viz", "--out", out], check=True)
            path = os.path.join(HERE, f"{name}.png")
            shutil.copyfile(os.path.join(out, f"{name}.png"), path)
        print(f"{name}: {os.path.relpath(path)} ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
