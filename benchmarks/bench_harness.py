"""The benchmark harness: isolated stores, the figures' result rows, timing and process sampling,
and a store pre-filled with fake past runs. Nothing here judges a figure; the bench_* modules do."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from backprop_mcp.core.clock import now_iso
from backprop_mcp.core.records import TERMINAL_STATES, RunRecord, row_of
from backprop_mcp.core.store import Store
from backprop_mcp.runs.requests import RunRequest
from backprop_mcp.runs.service import Service

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PYTHON = sys.executable
BIN = Path(PYTHON).parent
# Every wait is bounded by this: a figure that never comes is reported, not waited for forever.
WAIT_SECONDS = 60.0
# Between two looks at a file or a process: short against the figures measured (tens of ms and
# up), and cheap enough (a stat or a small /proc read) not to steal the 2-core machine's CPU.
POLL_SECONDS = 0.002
# A run's record is polled more gently: each look reads JSON and checks the supervisor's pid.
RECORD_POLL_SECONDS = 0.02

T = TypeVar("T")


class BenchError(Exception):
    """A measurement could not be taken (a run failed, a figure never came)."""


@dataclass(frozen=True)
class Plan:
    """How much to measure: repetitions and sizes (the quick plan fits a CI step)."""

    quick: bool
    runs: int
    flood_lines: int
    overhead_seconds: float
    pause_cycles: int
    tree_runs: int
    mcp_calls: int
    mcp_spawns: int
    # Store sizes of the listing figures; the largest also serves the MCP figures. The quick plan
    # stops at 5,000: writing 20,000 run folders takes ~20 s on a slow disk.
    list_sizes: tuple[int, ...]

    @classmethod
    def make(cls, *, quick: bool, runs: int | None) -> Plan:
        n = runs if runs is not None else (3 if quick else 10)
        return cls(
            quick=quick,
            runs=n,
            flood_lines=100_000 if quick else 1_000_000,
            overhead_seconds=3.0 if quick else 20.0,
            pause_cycles=max(2, n // 2) if quick else max(2, min(n, 8)),
            tree_runs=1 if quick else max(1, n // 3),
            mcp_calls=(5 if quick else 10) * n,
            mcp_spawns=1 if quick else max(1, min(n // 2, 5)),
            list_sizes=(100, 1_000, 5_000) if quick else (100, 5_000, 20_000),
        )


@dataclass
class Row:
    """One line of the table: a figure against its floor and its target.

    `verdict` is "pass", "MISS", "info" (a figure with no target), or "not measured yet".
    """

    figure: str
    floor: str
    measured: str
    target: str
    ratio: str
    verdict: str
    note: str = ""


def check(ok: bool) -> str:
    return "pass" if ok else "MISS"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if abs(seconds) < 10 else f"{seconds:.1f} s"


def plus(seconds: float, *, precise: bool = False) -> str:
    """A signed difference, "+ 12 ms" or "- 159 ms" (tenths of a millisecond when precise)."""
    sign = "+" if seconds >= 0 else "-"
    return f"{sign} {abs(seconds) * 1000:.1f} ms" if precise else f"{sign} {ms(abs(seconds))}"


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no sample was taken")
    return statistics.median(values)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = psutil.virtual_memory().total / 2**30
    return {
        "cpu": f"{model}, {os.cpu_count()} cores",
        "ram": f"{ram:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def wait_until(
    check_: Callable[[], T | None], *, what: str, timeout: float = WAIT_SECONDS, poll: float = POLL_SECONDS
) -> T:
    """check_()'s first truthy value; BenchError if none comes within the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check_()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def wall(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> float:
    """Seconds from spawning a command to its exit (it must succeed)."""
    began = time.perf_counter()
    done = subprocess.run(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        timeout=WAIT_SECONDS,
    )
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return took


def first_line(path: Path, *, timeout: float = WAIT_SECONDS) -> str:
    """The first complete line of a file once it has one."""

    def line() -> str | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data.split(b"\n", 1)[0].decode() if b"\n" in data else None

    return wait_until(line, what=f"a first line in {path}", timeout=timeout)


def read_words(path: Path, *, timeout: float = WAIT_SECONDS) -> list[str]:
    """The words a fixture wrote to `path` (written once, whole, before the fixture moves on)."""

    def words() -> list[str] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return text.split() or None

    return wait_until(words, what=f"{path.name} to be written", timeout=timeout)


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, T, Z...), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :][:1].decode()


def pids_of_run(run_id: str) -> list[int]:
    """Living processes whose environment carries this BACKPROP_RUN_ID (zombies have none)."""
    needle = f"BACKPROP_RUN_ID={run_id}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
    return found


def proc_io(pid: int) -> dict[str, int]:
    """The I/O counters of a process's main thread: wchar (bytes handed to write calls),
    write_bytes, syscw.

    Read per thread on purpose: /proc/PID/io also counts the I/O of every child the process has
    reaped, so a supervisor's figure would include its script's own output once it ends.
    """
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/task/{pid}/io").read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value)
    return fields


@dataclass
class Sampler:
    """Samples one process (a supervisor) until it ends: peak RSS, its own CPU time and I/O
    counters (children excluded), and the times its run's record file was replaced (a new inode
    per atomic write)."""

    pid: int
    record_path: Path | None = None
    interval: float = 0.02
    peak_rss: int = 0
    cpu_seconds: float = 0.0
    io: dict[str, int] = field(default_factory=dict)
    replaced_at: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, name=f"sample-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        inode = None
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
                times = proc.cpu_times()
                self.cpu_seconds = times.user + times.system
                self.io = proc_io(self.pid)
            except (psutil.Error, OSError, ValueError):
                return
            if self.record_path is not None:
                with contextlib.suppress(OSError):
                    now = os.stat(self.record_path).st_ino
                    if inode is not None and now != inode:
                        self.replaced_at.append(time.time())
                    inode = now
            self._stop.wait(self.interval)


class Workspace:
    """A temporary folder holding the fixtures, a working directory and isolated stores."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / "work"
        shutil.copytree(FIXTURES, self.work)
        self.started: list[tuple[Service, str]] = []
        self.template: RunRecord | None = None
        self._filled: set[int] = set()

    @classmethod
    @contextlib.contextmanager
    def temporary(cls) -> Iterator[Workspace]:
        with tempfile.TemporaryDirectory(prefix="backprop-bench-", ignore_cleanup_errors=True) as tmp:
            space = cls(Path(tmp))
            space.warm_up()
            try:
                yield space
            finally:
                space.stop_all()

    def script(self, name: str) -> str:
        return str(self.work / name)

    def base_env(self) -> dict[str, str]:
        """This environment, without BACKPROP_* settings, and with bytecode caching on.

        An installed package runs from compiled bytecode; a PYTHONDONTWRITEBYTECODE=1 inherited
        from a sandbox would make every process recompile backprop_mcp from source (~0.3 s).
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKPROP_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def warm_up(self) -> None:
        """Compile backprop_mcp's bytecode once, so that no measured process pays for it."""
        import backprop_mcp

        subprocess.run(
            [PYTHON, "-m", "compileall", "-q", *backprop_mcp.__path__],
            env=self.base_env(),
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=WAIT_SECONDS,
        )

    def env(self, home: str, **extra: str) -> dict[str, str]:
        """A store of its own, no user config, limits that admit runs on a small busy machine."""
        env = self.base_env()
        env.update(
            BACKPROP_HOME=str(self.root / home),
            BACKPROP_CONFIG=str(self.root / "no-user-config.json"),
            BACKPROP_MIN_FREE_RAM_GB="0",
            BACKPROP_MAX_CPU_PERCENT="100",
            BACKPROP_GPU_PROBE="none",
            BACKPROP_MAX_PARALLEL="64",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        env.pop("VIRTUAL_ENV", None)
        env.update(extra)
        return env

    def past_runs(self, count: int) -> str:
        """The name of a store holding `count` finished past runs (filled on first use, cloned
        from `template`, a real finished record); runs started there later are added to them."""
        if self.template is None:
            raise BenchError("no template record yet: measure the launch figures first")
        home = f"past-{count}"
        if count not in self._filled:
            prefill(Store(self.root / home), self.template, count)
            self._filled.add(count)
        return home

    def service(self, home: str, **extra: str) -> Service:
        env = self.env(home, **extra)
        return Service(Path(env["BACKPROP_HOME"]), env=env, cwd=self.work)

    def start(self, service: Service, script: str, *args: str, **options: object) -> RunRecord:
        record = service.start(RunRequest(script=self.script(script), args=list(args), options=dict(options)))
        self.started.append((service, record["run_id"]))
        return record

    def stop_all(self) -> None:
        """Kill every run a benchmark left live (after a failed measurement), then wait for the
        supervisors, which still write the queue's files just after their final record."""
        supervisors = []
        for service, run_id in self.started:
            with contextlib.suppress(Exception):
                supervisors.append(psutil.Process(supervisor_pid(service, run_id)))
                if service.get(run_id)["status"] not in TERMINAL_STATES:
                    service.stop(run_id, force=True)
        psutil.wait_procs(supervisors, timeout=WAIT_SECONDS)


def supervisor_pid(service: Service, run_id: str) -> int:
    """The supervisor's pid, written by `Service.start` before it returns."""
    info = json.loads((service.store.run_dir(run_id) / "supervisor.pid").read_text(encoding="utf-8"))
    return int(info["pid"])


def script_pid(service: Service, run_id: str) -> int:
    def pid() -> int | None:
        return service.get(run_id)["script_pid"]

    return wait_until(pid, what=f"the script of {run_id} to start", poll=RECORD_POLL_SECONDS)


def wait_for_end(service: Service, run_id: str, *, timeout: float = WAIT_SECONDS * 5) -> RunRecord:
    def ended() -> RunRecord | None:
        record = service.get(run_id)
        return record if record["status"] in TERMINAL_STATES else None

    return wait_until(ended, what=f"run {run_id} to end", timeout=timeout, poll=RECORD_POLL_SECONDS)


def prefill(store: Store, template: RunRecord, count: int) -> None:
    """Add `count` finished past runs, cloned from a real record, older than any real run.

    Written straight to their files (no fsync) through the store's layout, with one index row
    each; what listing and the supervisor see is a real store. (Their empty logs folders are left
    out: nothing measured reads them, and 20,000 more folders cost seconds to make and delete.)
    """
    store.ensure()
    base = time.time() - 86_400 * 30
    rows = []
    for i in range(count):
        record = json.loads(json.dumps(template))
        stamp = now_iso(base + i)
        run_id = f"past-{i:06d}"
        record.update(
            run_id=run_id,
            name=f"sweep-{i % 97}",
            created_at=stamp,
            updated_at=stamp,
            started_at=stamp,
            ended_at=stamp,
            step=i,
            loss=1.0 / (i + 1),
        )
        store.run_dir(run_id).mkdir(mode=0o700)
        store.record_path(run_id).write_text(json.dumps(record, indent=1), encoding="utf-8")
        rows.append(json.dumps({**row_of(record), "new": True}))
    index = store.index_path.read_text(encoding="utf-8") if store.index_path.exists() else ""
    store.index_path.write_text("\n".join(rows) + "\n" + index, encoding="utf-8")
