"""Runs inside `unshare --user --map-root-user --mount`: mounts a size-limited tmpfs on a folder
(root of its own user namespace, so no privilege is needed outside it), then runs the commands it
is sent, one JSON line each ({"argv", "env", "cwd"}), answering {"rc", "stdout", "stderr"} per
line, until its stdin closes. Its first line is {"mounted": true} or {"error": why}.

Standard library only: it is started as a plain script.

Usage: userns_tmpfs.py FOLDER SIZE
"""

import json
import subprocess
import sys

# A command that runs longer than this is answered as failed (rc 124) rather than hang the test.
COMMAND_SECONDS = 120


def main() -> None:
    folder, size = sys.argv[1], sys.argv[2]
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", folder],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(json.dumps({"error": (done.stderr or done.stdout).strip()}), flush=True)
        return
    print(json.dumps({"mounted": True}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        try:
            ran = subprocess.run(
                ask["argv"],
                env=ask["env"],
                cwd=ask["cwd"],
                capture_output=True,
                text=True,
                timeout=COMMAND_SECONDS,
                check=False,
            )
            answer = {"rc": ran.returncode, "stdout": ran.stdout, "stderr": ran.stderr}
        except subprocess.TimeoutExpired:
            answer = {"rc": 124, "stdout": "", "stderr": "timed out"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
