"""The notebook commands: `backprop note RUN_ID [TEXT] [--tag T]` (add a note and tags, or show the
notebook) and `backprop tag RUN_ID TAG... [--remove]`, and the notebook as text."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from backprop_mcp.cli.render import clean, print_json
from backprop_mcp.core.notebook import Notebook

if TYPE_CHECKING:
    from backprop_mcp.runs.service import Service

# `backprop status RUN_ID` shows this many of the newest notes; `backprop note RUN_ID` all of them.
STATUS_NOTES = 5


def dispatch_notes(service: Service, ns: argparse.Namespace) -> int:
    if ns.command == "tag":
        tags, untag = ([], ns.tags) if ns.remove else (ns.tags, [])
        notebook = service.annotate(ns.run_id, tags=tags, untag=untag, source="cli")
    elif ns.text is None and not ns.tags:
        notebook = service.notebook(ns.run_id)
        print_json(notebook) if ns.json else print(notebook_text(notebook), end="")
        return 0
    else:
        notebook = service.annotate(ns.run_id, note=ns.text, tags=ns.tags, source="cli")
    if ns.json:
        print_json(notebook)
    else:
        tags = ", ".join(notebook["tags"]) or "none"
        print(clean(f"{ns.run_id}: {len(notebook['notes'])} note(s); tags: {tags}"))
    return 0


def notebook_text(notebook: Notebook, *, heading: bool = False) -> str:
    """The notebook as lines: its tags, then its notes oldest first, each line escaped (a note may
    hold anything but control characters; its newlines start indented lines). With `heading` (in
    `status`): aligned with the record's fields, the newest STATUS_NOTES notes only, and nothing
    for an empty notebook."""
    notes = notebook["notes"]
    lines = []
    if notebook["tags"] or not heading:
        lines.append(("tags       " if heading else "tags: ") + (", ".join(notebook["tags"]) or "none"))
    if heading and len(notes) > STATUS_NOTES:
        lines.append(f"notes      {len(notes) - STATUS_NOTES} earlier (backprop note {notebook['run_id']})")
        notes = notes[-STATUS_NOTES:]
    if not heading and not notes:
        lines.append("no notes")
    for note in notes:
        head = f"{note['at'][:19].replace('T', ' ')} {note['source']}: "
        first, *rest = note["text"].split("\n")
        lines.append(("note       " if heading else "") + head + first)
        pad = " " * (len(head) + (11 if heading else 0))
        lines.extend(pad + more for more in rest)
    return "".join(clean(line) + "\n" for line in lines)
