"""What a run id may be: the one rule every path that names a run folder (the store, the CLI, the
MCP arguments, sweeps) checks, so no id can reach outside the store. Stdlib only."""

from __future__ import annotations

import re
from typing import TypeGuard

from backprop_mcp.core.errors import UsageError

# Used with fullmatch: `$` would also match before a final newline, letting "id\n" through.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_run_id(run_id: object) -> TypeGuard[str]:
    """1-128 letters, digits, '-', '_' or '.', starting with a letter or digit, no '..'."""
    return isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) is not None and ".." not in run_id


def check_run_id(run_id: str) -> str:
    """A run id is 1-128 letters, digits, '-', '_' or '.', not starting with a separator."""
    if not valid_run_id(run_id):
        raise UsageError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return run_id
