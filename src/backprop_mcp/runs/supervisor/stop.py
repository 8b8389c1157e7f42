"""The supervisor's last phase: signalling the run's whole process tree, ending every process the
script left behind, and recording the truthful outcome of the attempt."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

import psutil

from backprop_mcp.core.clock import now_iso
from backprop_mcp.governor import proctree
from backprop_mcp.runs.outcome import classify, describe
from backprop_mcp.runs.supervisor.queue import QueuedSupervisor

log = logging.getLogger("backprop_mcp.runs.supervisor")

# When the script has exited, processes it left behind get this long after SIGTERM.
LEFTOVER_GRACE_SECONDS = 1.0


class EndingSupervisor(QueuedSupervisor):
    """The ending phase of a supervisor: its process tree and its outcome."""

    def _tree(self) -> list[psutil.Process]:
        return [p for p in proctree.descendants(os.getpid()) if p.pid not in self.helper_pids]

    def _signal_tree(self, sig: int) -> None:
        # The group by its leader's pid only while the script is unreaped: then that pid is surely
        # still the script's (a reaped leader's number can be reused).
        group = None
        if (
            self.proc is not None
            and self.proc.returncode is None
            and proctree.signal_group(self.proc.pid, sig)
        ):
            group = self.proc.pid
        # Then each descendant that left the group. Not the group's members again: a second
        # SIGTERM can land after the script's handler ran, while it exits with the default action
        # back in place (Python restores it at shutdown), and kill a script that ended cleanly.
        proctree.signal_all([p for p in self._tree() if group is None or _group_of(p.pid) != group], sig)

    def _end_leftovers(self) -> None:
        """After the script exits, end what it left behind: SIGTERM, a short grace, then SIGSTOP
        and SIGKILL until none is left (`proctree.end_all`), forkers and setsid daemons included.
        The environment reader is waited for first: its interpreter is below us too."""
        self.join_environment_reader()
        left = [p for p in self._tree() if self.proc is None or p.pid != self.proc.pid]
        found = {key for key in map(proctree.identity, left) if key is not None}
        if left:
            proctree.signal_all(left, signal.SIGCONT)
            proctree.signal_all(left, signal.SIGTERM)
            psutil.wait_procs(left, timeout=LEFTOVER_GRACE_SECONDS)
            self._reap()
        # As the subreaper, every process the script left is below us, setsid or not; the token
        # finds any that a nested subreaper or a dead middleman detached from our tree.
        targets = proctree.Targets(below=(os.getpid(),), token=self.token)
        killed, _ = proctree.end_all(targets, reap=self._reap)
        self.leftovers_ended += len(killed | found)
        self._reap()

    def _reap(self) -> None:
        # As a subreaper we inherit orphans; collect their exit status so none stays a zombie.
        if self.proc is None or self.proc.returncode is not None:
            # The script is reaped, so every child left is an orphan: one call per zombie.
            with contextlib.suppress(ChildProcessError, OSError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            return
        for child in proctree.descendants(os.getpid()):
            if self.proc is not None and child.pid == self.proc.pid:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(child.pid, os.WNOHANG)

    # -- outcome ----------------------------------------------------------------------------------

    def finish(self, proc: subprocess.Popen[bytes]) -> None:
        record = self.record
        code = proc.returncode
        record["ended_at"] = now_iso()
        record["eta_seconds"] = None
        # A stop (or deadline) that came after the script had exited on its own changed nothing.
        reason, why = self._requested_reason(self.stop_reason if self.stop_acted else None)
        outcome = classify(reason, code, box_used=self.box_used)
        record["exit_code"], record["signal"] = outcome.exit_code, outcome.signal
        record["termination_reason"] = outcome.reason
        self._close_attempt(outcome.status)
        # Before the final state: whoever sees the run ended finds its whole history, and the
        # whole provenance of the attempt.
        self.write_history()
        self.join_environment_reader()  # (done already, unless the script never ended by itself)
        # Released before the final state is written: whoever sees the run ended (and resumes
        # it) finds its slot free, and this release can only ever remove this attempt's slot.
        self._release()
        # Compacted before too: the final state is the supervisor's last change to the store, so
        # whoever sees it (a walk of the store, a resume) finds it quiescent.
        self.store.maybe_compact()
        detail = describe(outcome, why or record["status_detail"])
        if self.leftovers_ended:
            detail += f"; {self.leftovers_ended} process(es) it left behind were killed"
        self.set_state(
            outcome.status,
            detail,
            reason=outcome.reason,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            leftovers_killed=self.leftovers_ended,
        )


def _group_of(pid: int) -> int | None:
    """The process group of `pid`; None when it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None
