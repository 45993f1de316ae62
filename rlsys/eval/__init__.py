"""Evaluation: `python -m rlsys.eval model=PATH task=NAME [k=N]` (see rlsys.eval.cli).

rlsys.eval.metrics holds the pure metric functions (pass@k, pass@1, cons@k, answer
normalisation); rlsys.eval.evaluator drives the engines and reward workers.
"""
