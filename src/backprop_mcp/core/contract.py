"""Names of the script contract (DESIGN §4): environment variables, argv flags and event names.

Stdlib-only and import-free so that `backprop_mcp.script` (which runs inside users' training
scripts) and the supervisor can share these names without importing anything heavy.
"""

from __future__ import annotations

ENV_RUN_ID = "BACKPROP_RUN_ID"
ENV_RUN_DIR = "BACKPROP_RUN_DIR"
ENV_CHECKPOINT_DIR = "BACKPROP_CHECKPOINT_DIR"
ENV_ATTEMPT = "BACKPROP_ATTEMPT"
ENV_RESUME_FROM = "BACKPROP_RESUME_FROM"
ENV_DEADLINE = "BACKPROP_DEADLINE"
ENV_CHECKPOINT_EVERY_SECONDS = "BACKPROP_CHECKPOINT_EVERY_SECONDS"
ENV_FRAMEWORK = "BACKPROP_FRAMEWORK"
ENV_GPU_MEMORY_LIMIT_MB = "BACKPROP_GPU_MEMORY_LIMIT_MB"
ENV_GPU_MEMORY_FRACTION = "BACKPROP_GPU_MEMORY_FRACTION"
ENV_STOP_SIGNAL = "BACKPROP_STOP_SIGNAL"
# A sweep's trial only: its sweep and its parameters as one JSON object.
ENV_SWEEP_ID = "BACKPROP_SWEEP_ID"
ENV_PARAMS = "BACKPROP_PARAMS"

# All the variables above, for documentation and for `--dry-run`.
CONTRACT_ENV = (
    ENV_RUN_ID,
    ENV_RUN_DIR,
    ENV_CHECKPOINT_DIR,
    ENV_ATTEMPT,
    ENV_RESUME_FROM,
    ENV_DEADLINE,
    ENV_CHECKPOINT_EVERY_SECONDS,
    ENV_FRAMEWORK,
    ENV_GPU_MEMORY_LIMIT_MB,
    ENV_GPU_MEMORY_FRACTION,
    ENV_STOP_SIGNAL,
    ENV_SWEEP_ID,
    ENV_PARAMS,
)

# Event names a script may print, one JSON object per stdout line.
EVENT_PROGRESS = "progress"
EVENT_METRIC = "metric"
EVENT_CHECKPOINT = "checkpoint_saved"
EVENT_DONE = "done"
EVENTS = (EVENT_PROGRESS, EVENT_METRIC, EVENT_CHECKPOINT, EVENT_DONE)

FRAMEWORKS = ("pytorch", "tensorflow", "jax", "none")

# The exit status of a script that stopped itself because its deadline was near (`timeout(1)`'s).
EXIT_DEADLINE = 124
