"""Hydra sweeper plugin `hydra/sweeper=optuna`: an Optuna study over a run's selection score (optuna_sweeper.py).

Hydra finds it in the `hydra_plugins` namespace package; Optuna itself is imported only when a study starts, so
that every other command stays fast and works without it.
"""
