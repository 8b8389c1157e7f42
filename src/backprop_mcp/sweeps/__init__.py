"""Hyperparameter sweeps: the parameter space (`space`), the samplers (`samplers`: grid, random,
Optuna's TPE imported only when asked for), scoring and the summary of results (`objective`),
early stopping by the median rule (`pruning`), the sweep record in the store (`store`, shapes in
`shapes`), the detached runner process (`runner`, `python -m backprop_mcp.sweeps`) and the
use-cases both adapters call (`service.Sweeps`).

A sweep's trials are ordinary runs started through `runs.service.Service`, so the queue, the
governor and the time box apply to them unchanged. This package sits in the runs layer: it may
import `runs`, `backends`, `governor` and `core`; `runs` never imports it. Imports nothing itself.
"""
