"""Solver overhead of neuralode, torchdiffeq and torchode on MLP vector fields, in one process.

    python benchmarks/overhead.py [--threads 1] [--cases tiny medium large] [--out runs/bench/overhead.json]

Same as ``neuralode bench``; the code is ``neuralode.experiments.bench``.
"""

from neuralode.experiments.bench import main

if __name__ == "__main__":
    main()
