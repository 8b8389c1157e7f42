"""A fake `nvidia-smi` on PATH for tests: GPUs and compute processes come from a JSON state file.

Use it to drive real runs through the real `nvidia-smi` probe (a hot GPU skipped, a cool one
pinned, a run paused when its GPU heats up):

    fake = FakeNvidiaSmi(tmp_path)
    fake.set_gpus([{"index": 0, "temperature_c": 90}, {"index": 1, "memory_free_mb": 30000}])
    subprocess.run([...], env=fake.env())          # or monkeypatch.setenv("PATH", fake.path)

Every call of the fake re-reads the state, so a test may change it while a run is going. State
writes are atomic, so the fake never reads half a file. Every GPU query appends its caller's pid to
a calls file before it reads the state, so a test can wait for a supervisor's samples taken after
a change (`gpu_queries(by=pid)`).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_SCRIPT = """#!{python}
# Fake nvidia-smi written by tests/fake_gpu.py; answers --query-gpu and --query-compute-apps.
import json, os, sys, time

GPU_FIELDS = {{
    "index": "index", "uuid": "uuid", "name": "name", "memory.total": "memory_total_mb",
    "memory.used": "memory_used_mb", "memory.free": "memory_free_mb",
    "temperature.gpu": "temperature_c", "utilization.gpu": "utilization_pct",
}}
APP_FIELDS = {{"gpu_uuid": "gpu_uuid", "pid": "pid", "used_memory": "used_memory_mb"}}

if any(arg.startswith("--query-gpu=") for arg in sys.argv[1:]):
    # The caller's pid, in one write of one short line to an O_APPEND file: concurrent callers
    # never mix lines.
    with open({calls!r}, "a", encoding="utf-8") as f:
        f.write("%d\\n" % os.getppid())
with open({state!r}, encoding="utf-8") as f:
    state = json.load(f)
if state["hang"]:
    time.sleep(3600)
if state["fail"] is not None:
    print(state["fail"]["message"])
    sys.exit(state["fail"]["status"])

def show(value):
    if value is None:
        return "[N/A]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

for arg in sys.argv[1:]:
    for flag, fields, rows in (
        ("--query-gpu=", GPU_FIELDS, state["gpus"]),
        ("--query-compute-apps=", APP_FIELDS, state["processes"]),
    ):
        if arg.startswith(flag):
            asked = arg[len(flag):].split(",")
            for name in asked:
                if name not in fields:
                    print('Field "%s" is not a valid field to query.' % name)
                    sys.exit(2)
            for row in rows:
                print(", ".join(show(row.get(fields[name])) for name in asked))
            sys.exit(0)
print("fake nvidia-smi: nothing asked")
"""

_GPU_DEFAULTS: dict[str, object] = {
    "name": "NVIDIA Fake GPU",
    "memory_total_mb": 24576,
    "memory_used_mb": 0,
    "temperature_c": 40,
    "utilization_pct": 0,
}


class FakeCommand:
    """An executable `name` in `tmp_path/<folder>` that answers from a JSON state file: the fake
    side of a probe boundary (nvidia-smi, rocm-smi). Subclasses give the script and the state."""

    def __init__(
        self, tmp_path: Path, *, folder: str, name: str, script: str, state: dict[str, object]
    ) -> None:
        self.bin_dir = tmp_path / folder
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = tmp_path / f"{name.replace('-', '_')}_state.json"
        self.calls_path = tmp_path / f"{name.replace('-', '_')}_calls.log"
        self.executable = self.bin_dir / name
        self._state = state
        self._save()
        self.executable.write_text(
            script.format(python=sys.executable, state=str(self.state_path), calls=str(self.calls_path)),
            encoding="utf-8",
        )
        self.executable.chmod(self.executable.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    @property
    def path(self) -> str:
        """A PATH value with the fake first."""
        return os.pathsep.join([str(self.bin_dir), os.environ.get("PATH", os.defpath)])

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with the fake first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", os.defpath)])
        return env

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state), encoding="utf-8")
        os.replace(tmp, self.state_path)


class FakeNvidiaSmi(FakeCommand):
    """An executable `nvidia-smi` in `tmp_path/bin` answering from `tmp_path/nvidia_smi_state.json`."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(
            tmp_path,
            folder="bin",
            name="nvidia-smi",
            script=_SCRIPT,
            state={"gpus": [], "processes": [], "fail": None, "hang": False},
        )

    def set_gpus(self, gpus: Sequence[Mapping[str, object]]) -> None:
        """The GPU table: dicts with GpuInfo's keys; `index` is required, the rest have defaults.

        Defaults: uuid `GPU-fake-<index>`, a 24 GiB "NVIDIA Fake GPU" at 40 C with nothing used,
        free = total - used. None prints as `[N/A]`; a string prints as it is (e.g. "[Not Supported]").
        """
        table = []
        for gpu in gpus:
            row = {**_GPU_DEFAULTS, "uuid": f"GPU-fake-{gpu['index']}", **gpu}
            if "memory_free_mb" not in gpu:
                total, used = row["memory_total_mb"], row["memory_used_mb"]
                if isinstance(total, int | float) and isinstance(used, int | float):
                    row["memory_free_mb"] = total - used
                else:
                    row["memory_free_mb"] = None
            table.append(row)
        self._state["gpus"] = table
        self._save()

    def gpu_queries(self, by: int) -> int:
        """How many GPU queries the fake has begun to answer for the process `by` (a run's
        supervisor, say). Each reads the state after it is counted, so a query counted after a
        `set_gpus` sees the new table."""
        if not self.calls_path.exists():
            return 0
        return self.calls_path.read_text(encoding="utf-8").split().count(str(by))

    def set_processes(self, processes: Sequence[Mapping[str, object]]) -> None:
        """Compute processes: dicts with `gpu_uuid`, `pid` and `used_memory_mb` (None is `[N/A]`)."""
        self._state["processes"] = [dict(p) for p in processes]
        self._save()

    def fail(
        self,
        message: str = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
        status: int = 9,
    ) -> None:
        """Make every call print `message` and exit with `status`, as a broken driver does."""
        self._state["fail"] = {"message": message, "status": status}
        self._save()

    def hang(self, hang: bool = True) -> None:
        """Make every call hang (for an hour) before answering, as a wedged driver does."""
        self._state["hang"] = hang
        self._save()

    def heal(self) -> None:
        """Undo `fail` and `hang`."""
        self._state["fail"] = None
        self._state["hang"] = False
        self._save()
