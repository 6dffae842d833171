"""Start-up benchmark: wall time and peak memory of command-line calls that need no model.

    python benchmarks/bench_startup.py              # 7 rounds
    python benchmarks/bench_startup.py --rounds 15

Each case is a fresh ``python -m vitdense ...`` process (what the ``vitdense`` entry point runs), timed
from spawn to exit; peak memory is the child's maximum resident set size (``ru_maxrss``). The baseline,
measured in the same run and interleaved round by round with the cases (so a busy machine slows both
alike), is ``python -c "import torch"``: what every command paid before the package imported torch, timm
and numpy only where they are needed. The table reports medians over the rounds and the ratio to the
baseline. Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [
    ("python -c 'import torch' (baseline)", ["-c", "import torch"]),
    ("vitdense --help", ["-m", "vitdense", "--help"]),
    ("vitdense models", ["-m", "vitdense", "models"]),
    ("vitdense cosegment --help", ["-m", "vitdense", "cosegment", "--help"]),
    ("vitdense extract x.jpg --load-size -5 (option error)", ["-m", "vitdense", "extract", "x.jpg", "--load-size",
                                                              "-5"]),
    ("python -c 'import vitdense'", ["-c", "import vitdense"]),
]


def run_once(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children so far)
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(args)} exited with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="Rounds; every case runs once per round.")
    args = parser.parse_args()
    for _, case in CASES:  # warm the file cache and .pyc files
        run_once(case)
    times: dict[str, list[float]] = {label: [] for label, _ in CASES}
    memory: dict[str, list[float]] = {label: [] for label, _ in CASES}
    for _ in range(args.rounds):
        for label, case in CASES:
            seconds, mb = run_once(case)
            times[label].append(seconds)
            memory[label].append(mb)
    base_label = CASES[0][0]
    base_t, base_m = statistics.median(times[base_label]), statistics.median(memory[base_label])
    width = max(len(label) for label, _ in CASES)
    print(f"{args.rounds} rounds, medians; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"| {'case':<{width}} | seconds (min-max) | peak RSS MB | time vs baseline | memory vs baseline |")
    print(f"|{'-' * (width + 2)}|---|---|---|---|")
    for label, _ in CASES:
        t, m = statistics.median(times[label]), statistics.median(memory[label])
        print(f"| {label:<{width}} | {t:.2f} ({min(times[label]):.2f}-{max(times[label]):.2f}) | {m:.0f} | "
              f"{t / base_t:.2f}x | {m / base_m:.2f}x |")


if __name__ == "__main__":
    main()
