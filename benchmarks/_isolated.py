"""Run one benchmark case in a fresh Python process, so that its peak RSS is its own."""
from __future__ import annotations

import json
import subprocess
import sys


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
