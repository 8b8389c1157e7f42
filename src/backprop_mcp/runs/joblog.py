"""The job log of a run on a cluster (docs/cluster.md): what a supervisor that runs as a Ray job's
entrypoint prints, and how the submitting side reads it back.

Every line the supervisor prints starts with a mark that holds a token drawn for the attempt at
submission (so a script cannot forge one: the token is not in its environment) and a kind:

- `o` / `e`: a line the script wrote on its stdout / stderr, unchanged; `O` / `E`: one that Ray
  would alter (a carriage return, bytes that are not UTF-8), as a JSON string (`output`);
- `r`: the run's record, as JSON, each time the supervisor writes it;
- `v`: an entry of the run's events, as JSON;
- `l`: a line of the supervisor's own log;
- `h`: the attempt's metric history, as JSON, at its end when not all of the script's output
  travelled (see `runs.supervisor.job.MAX_ECHO_BYTES`).

Lines without the mark (Ray's own notes, an interpreter that fails before the supervisor runs) are
kept as the supervisor's log. Stdlib only: the supervisor imports it at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The job's parameters, in its environment (the supervisor removes them before the script starts):
# the attempt's token; the record of the attempt (JSON, its script relative to the working
# directory); the store key (one folder per submitting store); the shared storage, when there is
# one; and for a stop job, what to stop and how.
MARK_ENV = "BACKPROP_JOB_MARK"
RECORD_ENV = "BACKPROP_JOB_RECORD"
STORE_KEY_ENV = "BACKPROP_JOB_STORE_KEY"
STORAGE_ENV = "BACKPROP_JOB_STORAGE"
STOP_ENV = "BACKPROP_JOB_STOP"
JOB_ENV = (MARK_ENV, RECORD_ENV, STORE_KEY_ENV, STORAGE_ENV, STOP_ENV)
KINDS = frozenset("oerlvhOE")
_TOKEN = re.compile(r"[0-9a-f]{12,64}")


def check_token(token: str) -> str:
    """A token as the submitter draws it (hex); anything else is refused."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not a job log token: {token!r}")
    return token


def mark(token: str, kind: str) -> bytes:
    """The start of a line of that kind."""
    return f"bp:{token}:{kind} ".encode("ascii")


def lines(text: str, token: str) -> Iterator[tuple[str | None, str]]:
    """(kind, payload) of each line of `text`: kind None for a line without the mark. Lines end at
    "\n" only, as the supervisor wrote them: a script's carriage returns (progress bars), form
    feeds and Unicode line separators stay inside its line."""
    head = f"bp:{token}:"
    for line in text.removesuffix("\n").split("\n") if text else ():
        if line.startswith(head) and len(line) > len(head) + 1 and line[len(head) + 1] == " ":
            kind = line[len(head)]
            if kind in KINDS:
                yield kind, line[len(head) + 2 :]
                continue
        yield None, line


def output(kind: str, payload: str) -> bytes:
    """The bytes the script wrote as a line of kind o/e, or O/E (quoted: a JSON string whose lone
    surrogates stand for bytes that were not UTF-8)."""
    if kind in ("O", "E"):
        try:
            text = json.loads(payload)
        except ValueError:
            text = payload
        if isinstance(text, str):
            return text.encode("utf-8", "surrogateescape")
    return payload.encode("utf-8", "replace")


def store_key(home: Path) -> str:
    """The folder of a submitting store on the cluster: runs of two stores never share one."""
    import socket

    return hashlib.sha256(f"{socket.gethostname()}:{home.resolve()}".encode()).hexdigest()[:16]


def job_home(storage: str | None, key: str) -> Path:
    """The node-side store of one submitting store: under the shared storage when there is one,
    else under the node's temporary folder (then only that node sees its checkpoints)."""
    base = Path(storage) if storage else Path(tempfile.gettempdir()) / f"backprop-ray-{os.getuid()}"
    return base / key
