"""Run benchmark cases in fresh Python processes, so that each one's peak RSS is its own."""
from __future__ import annotations

import json
import os
import resource
import select
import signal
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


def run_json(cmd: list, timeout: float, result_file: str | os.PathLike | None = None,
             env: dict | None = None) -> dict:
    """Run ``cmd`` in a process group of its own with a deadline; what it reported and how it ended.

    Returns ``{"status": "ok" | "failed" | "timeout", "seconds", "result", "error"}``. ``result`` is the JSON
    object in ``result_file`` when one is given (the case may rewrite it as it goes, so a case stopped at the
    deadline still reports what it finished), else the one on the last line of its stdout, else None. Past
    ``timeout`` the whole group is killed, data-loader workers and other children included, so a hanging case
    cannot hold the GPU for the next one. ``error`` is the tail of stderr of a case that did not end well.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=errors, text=True,
                                env=env, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, timeout))
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            status = "timeout"
        try:  # children left behind by a case that ended (e.g. orphaned workers) go too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        errors.seek(0)
        error = errors.read()[-3000:] if status != "ok" else ""
    result = None
    if result_file is not None and os.path.exists(result_file):
        with open(result_file) as f:
            result = json.load(f)
    elif stdout.strip():
        try:
            result = json.loads(stdout.strip().splitlines()[-1])
        except json.JSONDecodeError:
            result = None
        if status == "timeout" and result is not None:  # its last line is its whole report: only the exit was late
            status, error = "ok", ""
    if status == "ok" and result is None:
        status, error = "failed", "no JSON result"
    return {"status": status, "seconds": time.perf_counter() - start, "result": result, "error": error}


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
