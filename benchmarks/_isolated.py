"""Run benchmark cases in fresh Python processes, so that each one's peak RSS is its own."""
from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from typing import Callable


def run_isolated(script: str, case_args: list, timeout: float, label: str = "") -> dict | None:
    """Run ``python SCRIPT --case ...`` and return the JSON object it prints on its last line.

    A case that runs past ``timeout`` seconds gives ``{"timeout": True}``; one that fails prints the tail of
    its stderr (prefixed by ``label``) and gives None.
    """
    cmd = [sys.executable, script, "--case", *[str(a) for a in case_args]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": True}
    if proc.returncode != 0:
        print(f"[{label}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


class TurnTaker:
    """One benchmark case kept alive in its own process and timed one item at a time, on request.

    Timing two implementations turn by turn (ours, peer, peer, ours, ...) makes their ratio robust to the
    speed of a shared machine drifting during a run, which sequential cases are not. The process runs
    ``python SCRIPT --serve ...`` and answers through :func:`serve`; peak RSS stays its own.
    """

    def __init__(self, script: str, case_args: list, label: str):
        self.label = label
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, script, "--serve", *[str(a) for a in case_args]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     text=True)

    def ask(self, command: str, timeout: float) -> dict | None:
        """Send ``command`` ("ready", "go" or "stop"); the JSON reply, {"timeout": True}, or None on failure."""
        if self.proc.poll() is not None:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._failed()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            return {"timeout": True}
        line = self.proc.stdout.readline()
        return json.loads(line) if line else self._failed()

    def _failed(self) -> None:
        self.proc.wait()
        self.errors.seek(0)
        print(f"[{self.label}] failed:\n{self.errors.read()[-3000:]}", file=sys.stderr)
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.errors.close()


def serve(setup: Callable[[], Callable[[], None]], extra: Callable[[], dict]) -> None:
    """Server side of :class:`TurnTaker`: ``setup()`` returns the timed work (warmed up by the first "ready").

    Replies go to the original stdout; anything else the libraries print is sent to stderr so it cannot be
    mistaken for a reply. "stop" replies with ``extra()`` and the peak RSS in MB.
    """
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    one = None
    for line in sys.stdin:
        command = line.strip()
        if command == "ready":
            one = setup()
            one()  # warm-up (builds caches, as a user's first image would)
            reply = {"ready": True}
        elif command == "go":
            start = time.perf_counter()
            one()
            reply = {"seconds": time.perf_counter() - start}
        else:
            reply = dict(extra(), peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if command == "stop":
            return
