"""The per-run supervisor process (DESIGN §3), split by phase: `base` (state, record, signals),
`queue` (waiting for admission), `run` (starting and supervising the script: the time box, pauses,
output) and `stop` (ending the process tree, recording the outcome); `entry` is the process's
`main`, run by `python -m backprop_mcp.runs.supervisor`. Its modules import `runs`, `governor` and
`core` modules that start fast (stdlib plus psutil); never the service or a backend.
"""
