"""The whole device session in one command that cannot overrun: train the bundled backbone on the clock, then
the device suite, then the GPU tests, each step under its own wall-clock deadline, everything it writes
brought back in at most 8 files of ``--out``.

    python3 benchmarks/device_session.py --out $OUT                  # on the GPU machine (one `run` call)
    python benchmarks/device_session.py --out /tmp/rehearsal --rehearse   # the same code on the CPU, toy sizes

Steps, in this order (``benchmarks/device_suite.md`` has the call, its carry list and what to do with the
files that come back):

1. ``setup``  unpack the carried packages (``.whl/site-py312.tar.xz``: faiss, pydensecrf) into a folder on
   ``PYTHONPATH``;
2. ``train``  ``apps/train_bundled_backbone.py --deadline-s TRAIN``: DINO from ``--init`` (the newest export of the
   chain) on the carried data pack, with fresh composites; it stops on its own clock, exports, and writes the
   export in parts (with its SHA-256) into ``--out`` at once;
3. ``suite``  ``benchmarks/device_suite.py --budget SUITE``, its parts sized to what training left;
4. ``tests``  ``python -m pytest -m gpu tests/test_gpu.py`` under ``--tests-s``.

Each step runs in a process group of its own and is killed with all its children at its deadline; the next
step gets the time that is left. After every step, ``reports.tar.gz`` (training log, curves, command,
suite reports, test report) and ``session.json`` (the plan, each step's status, seconds and deadline) are
rewritten atomically, and ``session.log`` holds everything the steps printed. ``--out`` then holds the export's
parts, its ``.sha256``, ``reports.tar.gz``, ``session.json`` and ``session.log``: 7 files for a 43 MB export
(a file at most 16 MiB, the device tool brings back at most 8), and never more than one temporary file.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what the device tool brings back from $OUT
SITE_TAR = ROOT / ".whl" / "site-py312.tar.xz"

# Seconds of a 580-s session (the run's limit is 600 s): training first, as the suite can be re-run by a later
# session with the same code while a lost training run is a lost draw.
DEFAULTS = dict(budget=580.0, train_s=300.0, tests_s=50.0)
SETUP_S = 20.0
PACK_S = 10.0  # writing the reports and the session file at the end
REPACK_S = 30.0  # during a step, its files so far are packed into the reports this often
# The rehearsal: the same code at toy sizes on the CPU, every deadline scaled down.
REHEARSAL = dict(budget=150.0, train_s=55.0, tests_s=25.0)
TOY_TRAIN = ["--reserve-s", "12", "--arch", "vit_tiny_patch16_224", "--batch-size", "8", "--local-crops", "2", "--out-dim", "256",
             "--workers", "1", "--", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
             "--hidden-dim", "64", "--bottleneck-dim", "32"]


class Session:
    """The plan and what each step did, kept in ``OUT/session.json`` and ``OUT/reports.tar.gz``."""

    def __init__(self, out: Path, budget: float, plan: dict):
        self.out, self.start, self.budget = out, time.monotonic(), budget
        self.work = Path(tempfile.mkdtemp(prefix="device_session_"))
        self.log = open(out / "session.log", "a", buffering=1)
        self.reports: dict[str, Path] = {}  # name in the tar -> file
        self.env: dict | None = None  # the steps' environment
        self.data = {"plan": plan, "budget_s": budget, "steps": [], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                            time.gmtime())}
        self.save()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        line = f"[session {time.monotonic() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def run(self, name: str, cmd: list[str], deadline: float, env: dict | None = None,
            collect: Callable[[], None] | None = None) -> dict:
        """Run one step with a hard deadline (seconds from now); its output goes to the log as it comes, and
        every ``REPACK_S`` ``collect()`` adds the step's files so far to the reports, which are rewritten: a
        kill of the whole call mid-step still brings back what the step had written."""
        deadline = max(1.0, min(deadline, self.left() - PACK_S))
        self.say(f"step {name}: deadline {deadline:.0f} s: {' '.join(str(c) for c in cmd)}")
        step = {"step": name, "deadline_s": round(deadline, 1), "status": "running"}
        self.data["steps"].append(step)
        self.save()
        started = time.monotonic()
        step_log = self.work / f"{name}.log"
        with open(step_log, "w") as captured:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env or self.env, cwd=ROOT, start_new_session=True)

            def pump() -> None:
                for raw in iter(lambda: proc.stdout.read1(65536), b""):
                    text = raw.decode(errors="replace")
                    captured.write(text)
                    self.log.write(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            end = time.monotonic() + deadline
            status = "timeout"
            while time.monotonic() < end:
                try:
                    rc = proc.wait(timeout=min(REPACK_S, max(0.1, end - time.monotonic())))
                    status = "ok" if rc == 0 else f"failed (exit {rc})"
                    break
                except subprocess.TimeoutExpired:
                    if collect is not None:
                        self.reports[f"{name}.log"] = step_log
                        collect()
                        self.save()
            try:  # the whole group: loader workers and other children too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            reader.join(timeout=5)
        step.update(status=status, seconds=round(time.monotonic() - started, 1))
        self.reports[f"{name}.log"] = step_log
        if collect is not None:
            collect()
        self.say(f"step {name}: {status} after {step['seconds']} s; {self.left():.0f} s of the session left")
        self.save()
        return step

    def save(self) -> None:
        """session.json and reports.tar.gz, each written beside its name and renamed (one temporary at a time)."""
        self.data["seconds"] = round(time.monotonic() - self.start, 1)
        _atomic(self.out / "session.json", json.dumps(self.data, indent=1).encode())
        if self.reports:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for name, path in sorted(self.reports.items()):
                    try:  # read whole first: a file growing or replaced meanwhile cannot cut the archive
                        data = path.read_bytes()
                    except OSError:  # not written yet: the next packing has it
                        continue
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), int(time.time())
                    tar.addfile(info, io.BytesIO(data))
            _atomic(self.out / "reports.tar.gz", buf.getvalue())

    def add_reports(self, prefix: str, folder: Path, names: list[str] | None = None) -> None:
        for path in sorted(folder.glob("*")) if names is None else [folder / n for n in names]:
            if path.is_file() and not path.name.endswith(".tmp"):
                self.reports[f"{prefix}/{path.name}"] = path


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def plan_steps(budget: float, train_s: float, tests_s: float) -> dict[str, float]:
    """Seconds per step; the suite gets what training, tests, set-up and the final writing leave."""
    suite_s = budget - SETUP_S - train_s - tests_s - PACK_S
    if suite_s < 30:
        raise SystemExit(f"--budget {budget:g} s leaves {suite_s:.0f} s for the suite after training {train_s:g} s "
                         f"and tests {tests_s:g} s: give more time or less training")
    return {"setup": SETUP_S, "train": train_s, "suite": suite_s, "tests": tests_s, "pack": PACK_S}


def make_toy_pack(folder: Path) -> Path:
    """A tiny data pack for the rehearsal (photos/, cutouts/, backgrounds/ as ``apps/build_pretrain_set.py
    --pack`` writes it): crops of scikit-image's photos and discs cut out of them."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    for sub in ("photos/skimage", "cutouts", "backgrounds"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(24):
        img = sources[i % 4]
        y, x = rng.integers(0, img.shape[0] - 96), rng.integers(0, img.shape[1] - 96)
        Image.fromarray(img[y:y + 96, x:x + 96]).save(folder / "photos" / "skimage" / f"p{i:02d}.jpg")
    for i, img in enumerate(sources):
        Image.fromarray(img).resize((128, 96)).save(folder / "backgrounds" / f"b{i}.jpg")
        yy, xx = np.mgrid[:48, :48]
        alpha = (((yy - 24) ** 2 + (xx - 24) ** 2) <= 20 ** 2).astype(np.uint8) * 255
        crop = np.asarray(Image.fromarray(img).resize((48, 48)))
        Image.fromarray(np.dstack([crop, alpha]), "RGBA").save(folder / "cutouts" / f"c{i}.png")
    return folder


CARRY = [".whl", ".peers", "data/pretrain_pack"]
CARRY_LIMIT_MIB = 64.0
MIRRORS = {"dino": ("facebookresearch+dino", ["LICENSE", "main_dino.py", "utils.py", "vision_transformer.py",
                                              "eval_video_segmentation.py"]),
           "dino-vit-features": ("ShirAmir+dino-vit-features", ["LICENSE", "extractor.py", "correspondences.py",
                                                                "cosegmentation.py"])}


def tree_mib(extra: list[str]) -> tuple[float, dict[str, float]]:
    """MiB of what a device call sends: tracked and untracked-not-ignored files, plus the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in listed if f and (ROOT / f.decode()).is_file())
    carried = {p: sum(f.stat().st_size for f in (ROOT / p).rglob("*") if f.is_file()) / 2**20
               for p in extra if (ROOT / p).exists()}
    return tree / 2**20, carried


def prepare(mirror_root: Path) -> None:
    """Everything the device call carries, made here: the peers (from the search tool's fetched mirrors), the
    packages the device image lacks (faiss-cpu and pydensecrf2 for its Python 3.12, packed with xz), the data
    pack; then the size of what travels, checked against the limit, and the call to make."""
    import importlib.metadata

    for name, (mirror, files) in MIRRORS.items():
        dest = ROOT / ".peers" / name
        repo = mirror_root / mirror / "repo"
        if dest.is_dir():
            print(f"peers: {dest} present")
        elif repo.is_dir():
            dest.mkdir(parents=True)
            archive = subprocess.run(["git", f"--git-dir={repo}", "archive", "HEAD", *files], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
            print(f"peers: {dest} from {repo}")
        else:
            print(f"peers: {repo} missing: fetch github:{mirror.replace('+', '/')} with the search tool's fetch, "
                  f"then run --prepare again (without peers the suite skips the baselines)")
    if SITE_TAR.is_file():
        print(f"packages: {SITE_TAR} present")
    else:
        work = Path(tempfile.mkdtemp(prefix="device_prepare_"))
        faiss = importlib.metadata.version("faiss-cpu")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work / "whl")]
        subprocess.run(pip + ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                              f"faiss-cpu=={faiss}"], check=True)
        subprocess.run(pip + ["--no-binary=:all:", "pydensecrf2==1.1"], check=True)
        candidates = [shutil.which("python3.12")] + sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))
        py312 = next((c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode
                      == 0), None)
        if py312 is None:
            raise SystemExit("--prepare needs python3.12 (the device's Python) to build pydensecrf2's wheel")
        venv = work / "v312"
        subprocess.run([py312, "-m", "venv", str(venv)], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "-q", "numpy", "cython", "setuptools", "wheel"], check=True)
        sdist = next((work / "whl").glob("pydensecrf2-*.tar.gz"))
        env = {**os.environ, "CFLAGS": "-g0 -O2", "CXXFLAGS": "-g0 -O2"}
        subprocess.run([venv / "bin" / "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(work / "whl"), str(sdist)], check=True, env=env)
        site = work / "site"
        subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", str(site), *map(str, (work / "whl").glob("*.whl"))], check=True)
        SITE_TAR.parent.mkdir(exist_ok=True)
        subprocess.run(["tar", "-cJf", str(SITE_TAR), "--exclude=__pycache__", "-C", str(site), "."], check=True)
        shutil.rmtree(work, ignore_errors=True)
        print(f"packages: wrote {SITE_TAR} ({SITE_TAR.stat().st_size / 2**20:.1f} MiB)")
    pack = ROOT / "data" / "pretrain_pack"
    if pack.is_dir():
        print(f"data: {pack} present")
    else:
        subprocess.run([sys.executable, str(ROOT / "apps" / "build_pretrain_set.py"), "--pack", "--out", str(pack)],
                       check=True, cwd=ROOT)
    tree, carried = tree_mib(CARRY)
    total = tree + sum(carried.values())
    print(f"what travels: the tree {tree:.1f} MiB + " + " + ".join(f"{p} {m:.1f} MiB" for p, m in carried.items())
          + f" = {total:.1f} MiB of {CARRY_LIMIT_MIB:.0f}")
    if total > CARRY_LIMIT_MIB:
        raise SystemExit(f"{total:.1f} MiB is over the device tool's {CARRY_LIMIT_MIB:.0f} MiB: carry less")
    print("the call: run(carry=" + json.dumps(CARRY) + ", timeout_s=600, command=\"PYTHONUNBUFFERED=1 python3 "
          "benchmarks/device_session.py --out $OUT\")")


SHIP_TASKS = (("coseg", "jaccard"), ("saliency", "jaccard"))  # the scores a new bundled file must win on


def ship_decision(scores: dict[str, dict], new: str, current: str, floor: str = "random init"
                  ) -> tuple[bool, list[str]]:
    """(ship?, one line per score): the new export ships only when it beats both the random floor and the
    current bundled file on every score of SHIP_TASKS (a report card's ``scores``, by backbone label)."""
    ship, lines = True, []
    for task, metric in SHIP_TASKS:
        value = scores[new][task][metric]
        others = {label: scores[label][task][metric] for label in (current, floor) if label in scores}
        wins = all(value > other for other in others.values())
        ship &= wins and len(others) == 2
        lines.append(f"{task} {metric}: new {value:.3f} vs " + ", ".join(f"{k} {v:.3f}" for k, v in others.items())
                     + (" -> better" if wins else " -> NOT better"))
    return ship, lines


def finish(files: Path, ship: bool, name: str = "vitdense_vits8") -> None:
    """Here, after the call: join the export's parts, unpack the reports, grade the new export beside the
    current bundled file and the random floor (``vitdense evaluate``), and with ``ship`` replace the bundled
    file and its report card when the new one wins (:func:`ship_decision`)."""
    spec = importlib.util.spec_from_file_location("train_bundled_backbone", ROOT / "apps" / "train_bundled_backbone.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    folder = ROOT / "runs" / "device" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    if (files / "reports.tar.gz").is_file():
        with tarfile.open(files / "reports.tar.gz") as tar:
            tar.extractall(folder / "reports", filter="data")
    for extra in ("session.json", "session.log"):
        if (files / extra).is_file():
            shutil.copy(files / extra, folder / extra)
    new = app.join_parts(files, folder / f"{name}.safetensors")
    print(f"joined {new}; reports in {folder / 'reports'}")
    report = folder / "report"
    subprocess.run([sys.executable, "-m", "vitdense", "evaluate", "--weights", str(new), "--compare", name,
                    "--out", str(report)], check=True, cwd=ROOT)
    card = json.loads((report / "report.json").read_text())
    labels = [b["label"] for b in card["backbones"]]
    ok, lines = ship_decision(card["scores"], labels[0], name)
    print("\n".join(lines))
    if not ok:
        print(f"not shipped: {new} stays in {folder}; the next session continues from it with "
              f"--init {new} only if it travels (see benchmarks/device_suite.md)")
    elif ship:
        shutil.copy(new, ROOT / "vitdense" / "weights" / f"{name}.safetensors")
        shutil.copy(report / "report.json", ROOT / "vitdense" / "weights" / "eval.json")
        print(f"shipped: vitdense/weights/{name}.safetensors and eval.json replaced; update the model card")
    else:
        print("better on every score: run again with --ship to replace the bundled file")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the device tool's $OUT (created)")
    parser.add_argument("--rehearse", action="store_true",
                        help="the same steps on the CPU at toy sizes, deadlines scaled down (a tiny data pack, no "
                             "warm start, the suite's --toy)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole session (default 580; "
                                                                    "rehearsal 150)")
    parser.add_argument("--train-s", type=float, default=None, help="seconds for training, export included "
                                                                    "(default 300; rehearsal 55)")
    parser.add_argument("--tests-s", type=float, default=None, help="seconds for the GPU tests (default 50)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "pretrain_pack",
                        help="the data pack (photos/, cutouts/, backgrounds/) or a folder of images")
    parser.add_argument("--init", default="vitdense_vits8", help="weights training continues from: the newest "
                                                                 "export of the chain")
    parser.add_argument("--skip", nargs="*", default=[], choices=("train", "suite", "tests"),
                        help="steps to leave out (a re-run of the suite on a warm machine, say)")
    parser.add_argument("--prepare", action="store_true",
                        help="here, before the call: make what it carries (peers, packages, data pack) and check "
                             "its size; then print the call")
    parser.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"),
                        help="--prepare: where the search tool's fetch put the peers' repositories")
    parser.add_argument("--finish", type=Path, default=None, metavar="FILES",
                        help="here, after the call: join the export in FILES (the call's files), grade it beside "
                             "the bundled file and the floor, and say whether it ships")
    parser.add_argument("--ship", action="store_true", help="--finish: replace the bundled file when it wins")
    args = parser.parse_args(argv)
    if args.finish is not None:
        finish(args.finish, args.ship)
        return
    if args.prepare:
        prepare(args.mirrors)
        return
    if args.out is None:
        parser.error("--out is required (or --prepare)")
    preset = REHEARSAL if args.rehearse else DEFAULTS
    budget = args.budget or preset["budget"]
    train_s = 0.0 if "train" in args.skip else (args.train_s or preset["train_s"])
    tests_s = 0.0 if "tests" in args.skip else (args.tests_s or preset["tests_s"])
    plan = plan_steps(budget, train_s, tests_s)
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, budget, {**plan, "rehearse": args.rehearse, "init": args.init,
                                         "data": str(args.data), "skip": args.skip})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VITDENSE_OFFLINE": "1"}
    paths = [str(ROOT)]

    # 1. packages the device image lacks
    if SITE_TAR.is_file():
        site = session.work / "site"
        site.mkdir()
        session.run("setup", ["tar", "-xJf", SITE_TAR, "-C", site], SETUP_S)
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if args.rehearse:
        env["OMP_NUM_THREADS"] = "1"
    session.env = env

    # 2. training on the clock; the export's parts go straight into --out
    if "train" not in args.skip:
        data, init, extra = args.data, args.init, []
        if args.rehearse:
            data, init, extra = make_toy_pack(session.work / "pack"), "", TOY_TRAIN
        train_dir = session.work / "train"
        cmd = [sys.executable, ROOT / "apps" / "train_bundled_backbone.py", "--data", data, "--out", train_dir,
               "--deadline-s", f"{plan['train']:.0f}", "--parts-dir", args.out]
        cmd += (["--init", init] if init else []) + extra
        # the app keeps its own deadline (this one is the backstop); torch warns of any wait for the device
        # within a step in the log (the GPU tests make it an error)
        def collect_train() -> None:
            session.add_reports("train", train_dir, ["command.txt", "train_summary.json"])
            session.add_reports("train", train_dir / "run", ["log.jsonl", "curves.png", "config.json"])

        session.run("train", cmd, plan["train"] + 15, env={**env, "PRETRAIN_SYNC_DEBUG": "warn"},
                    collect=collect_train)
        session.save()

    # 3. the suite, sized to what is left
    if "suite" not in args.skip:
        suite_dir = session.work / "suite"
        suite_s = session.left() - tests_s - PACK_S
        cmd = [sys.executable, ROOT / "benchmarks" / "device_suite.py", "--out", suite_dir,
               "--budget", f"{suite_s:.0f}"] + (["--toy"] if args.rehearse else [])
        session.run("suite", cmd, suite_s + 10, collect=lambda: session.add_reports("suite", suite_dir))
        session.save()

    # 4. the GPU tests (they skip without CUDA; the rehearsal checks they are collected and run)
    if "tests" not in args.skip:
        report = session.work / "gpu_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p",
               "no:cacheprovider", f"--junitxml={report}"]
        session.run("tests", cmd, session.left() - PACK_S)
        session.reports["tests/gpu_tests.xml"] = report
    session.data["finished"] = True
    session.save()
    stray = [p for p in args.out.iterdir() if p.name.endswith(".tmp")]
    for p in stray:
        p.unlink()
    files = sorted(p.name for p in args.out.iterdir())
    session.say(f"done in {budget - session.left():.0f} s of {budget:.0f}; {len(files)} file(s) in {args.out}: "
                + ", ".join(files))
    if len(files) > MAX_FILES:
        session.say(f"WARNING: more than {MAX_FILES} files: the device tool brings back only {MAX_FILES}")
    session.log.close()
    shutil.rmtree(session.work, ignore_errors=True)


if __name__ == "__main__":
    main()
