"""Where a run's supervisor runs: the `Backend` protocol (`base`) that the service talks to, and
its implementations, `local` (a detached process on this machine) first. It may import `runs`
modules that do not import a backend (one layer with `runs`, no cycles), `governor` and `core`.
"""
