"""kdtune: search knowledge-distillation recipes with Ray Tune + Optuna, tracked in MLflow.

Entry point: `python -m kdtune.sweep SPEC` (see kdtune/sweep.py).
"""
