"""The integrators: Runge–Kutta tableaus and the adaptive loop, implicit and Rosenbrock methods, multistep Adams
methods, per-sample stepping, the compiled step and fixed-point solvers. Users reach them through
``neuralode.solve`` / ``neuralode.odeint`` by ``method=``; the modules are imported where they are needed."""
