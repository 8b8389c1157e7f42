"""The governor: what may run on this machine, and what is left of what ran. The pure decisions
(`decisions`), the probes that see the machine (`probes`, with `nvidia`, `rocm` and
`static_probe`), the machine-wide admission queue (`admission`) and the process-tree primitives
(`proctree`: liveness by pid and start time, the per-attempt ledger, ending every process of a
run) that the queue needs to reclaim a dead supervisor's slot. It may import `core` only.
"""
