"""The experiment harness: data, models, training loop, reports, recipes, command line, benchmark.

Needs the ``harness`` extra (matplotlib, tqdm, numpy); the optimizer library does not.
"""
