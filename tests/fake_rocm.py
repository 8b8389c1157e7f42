"""A fake `rocm-smi` on PATH for tests: its output comes from a state file, like tests/fake_gpu.py.

    fake = FakeRocmSmi(tmp_path)
    fake.set_output((DATA / "instinct_four_cards_rocm6.json").read_text(encoding="utf-8"))
    subprocess.run([...], env=fake.env())          # or monkeypatch.setenv("PATH", fake.path)

The fake answers only the exact query the probe documents (`rocm.ROCM_SMI_QUERY`); any other
arguments exit 2, so a change of the query is seen. Every call re-reads the state, so a test may
change it while a run is going; writes are atomic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from backprop_mcp.governor.rocm import ROCM_SMI_QUERY
from tests.fake_gpu import FakeCommand

_SCRIPT = """#!{python}
# Fake rocm-smi written by tests/fake_rocm.py.
import json, sys, time

with open({state!r}, encoding="utf-8") as f:
    state = json.load(f)
if state["hang"]:
    time.sleep(3600)
if sys.argv[1:] != state["query"]:
    print("fake rocm-smi: unexpected arguments", sys.argv[1:])
    sys.exit(2)
sys.stdout.write(state["output"])
sys.exit(state["status"])
"""


class FakeRocmSmi(FakeCommand):
    """An executable `rocm-smi` in `tmp_path/rocm-bin` answering from `tmp_path/rocm_smi_state.json`."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(
            tmp_path,
            folder="rocm-bin",
            name="rocm-smi",
            script=_SCRIPT,
            state={"query": list(ROCM_SMI_QUERY), "output": "{}", "status": 0, "hang": False},
        )

    def set_output(self, output: str, status: int = 0) -> None:
        """What every call prints on stdout, and its exit status."""
        self._state["output"], self._state["status"] = output, status
        self._save()

    def set_cards(self, cards: list[Mapping[str, object]]) -> None:
        """JSON output with one `cardN` object per mapping, in rocm-smi's key names."""
        self.set_output(json.dumps({f"card{i}": dict(card) for i, card in enumerate(cards)}))

    def hang(self, hang: bool = True) -> None:
        """Make every call hang (for an hour), as a wedged driver does."""
        self._state["hang"] = hang
        self._save()
