"""The lab notebook's use-cases (`Notebooks`, a part of `RunControl`): annotate a run with a note
and tags, read its notebook, and the first entry a start writes (its tags and hypothesis). The
files and their bounds are `core.notebook`'s."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from backprop_mcp.core import notebook
from backprop_mcp.core.errors import StoreError
from backprop_mcp.core.ids import check_run_id
from backprop_mcp.core.notebook import Notebook
from backprop_mcp.core.store import Store

if TYPE_CHECKING:
    from backprop_mcp.runs.requests import RunRequest

# Where a request came from (`RunRequest.source`) -> who a note says wrote it.
_SOURCES = {"option": "cli", "argument": "mcp"}


class Notebooks:
    """Notes and tags of the runs of `store` (mixed into `RunControl`, which sets it)."""

    store: Store

    def annotate(
        self,
        run_id: str,
        *,
        note: str | None = None,
        tags: Iterable[str] = (),
        untag: Iterable[str] = (),
        source: str = "cli",
    ) -> Notebook:
        """Append a note and add (`tags`) or remove (`untag`) tags, on a live or an ended run;
        returns its notebook after the change. Safe beside the run's supervisor and any number
        of other writers: nothing they write is lost, nor is this."""
        check_run_id(run_id)
        line = notebook.entry(source, note, tags, untag)  # a bad note or tag: refused before any read
        created_at = self.store.read(run_id)["created_at"]  # no such run: RunNotFound
        return notebook.write(self.store, run_id, created_at, line)

    def notebook(self, run_id: str) -> Notebook:
        """The run's notes (oldest first) and tags."""
        check_run_id(run_id)
        self.store.read(run_id)  # no such run: RunNotFound, not an empty notebook
        return notebook.read(self.store, run_id)

    def notebook_beside(self, run_id: str) -> tuple[Notebook, str | None]:
        """The notebook of a run whose record the caller has read (`status`, `get_status`): an
        unreadable notebook must not hide a readable record, so it comes back empty with why."""
        try:
            return notebook.read(self.store, run_id), None
        except StoreError as exc:
            return Notebook(run_id=run_id, tags=[], notes=[]), exc.message


def start_entry(request: RunRequest) -> dict[str, Any] | None:
    """The notebook's first line for a run the request starts (its tags and note, checked), or
    None when it gives neither."""
    if not request.tags and request.note is None:
        return None
    return notebook.entry(_SOURCES.get(request.source, "cli"), request.note, request.tags)
