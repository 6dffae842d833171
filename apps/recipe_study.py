"""Compare pretraining recipes at small scale: train variants of one recipe for the same number of steps with
the same seed, grade every teacher in one report card beside one random floor, and tabulate.

    python apps/recipe_study.py data/pretrain_set --out runs/study --max-steps 123 \\
        --variant base= --variant "dim256=--out-dim 256" --variant "temp02=--teacher-temp 0.02" \\
        -- --arch vit_tiny --patch-size 16 --global-size 96 --local-size 48 --batch-size 32 --epochs 3

DINO against BYOL: keep the method's own options in its variant and the shared ones in the base, e.g.
``--variant "dino=--local-crops 4 --local-size 48 --out-dim 4096" --variant "byol=--method byol"``
(an option of the other method is an error, see ``pretrain/config.py``).

Everything after ``--`` is the base recipe (``python -m pretrain`` options); each ``--variant NAME=FLAGS``
adds its FLAGS after them (the later option wins), ``NAME=`` being the base itself. The study sets
``--out``, ``--max-steps`` and ``--seed``. Give ``--epochs`` so that the schedules (learning rate, weight
decay, teacher momentum) end at ``--max-steps``: a run stopped early by ``--max-steps`` is graded
mid-schedule, with its teacher still lagging.

Outputs in ``OUT``: ``runs/NAME/`` (each pretrain run: log.jsonl, curves.png, teacher_backbone.pth, ...),
``weights/NAME.pth`` (links to the teachers, so the report card is labelled with the variant names),
``report/`` (the one ``vitdense evaluate --tasks coseg,saliency,knn`` call: report.md, report.json,
charts/, examples/), ``study.json`` and ``study.md`` (per variant: the report-card scores, the loss,
teacher entropy and KL at the end of training, and the minutes it took).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FLOOR = "random init"  # the label `vitdense evaluate` gives its random-initialisation floor
# options the study sets itself, the same for every variant
RESERVED = ("--out", "--max-steps", "--seed", "--resume")
# (task, metric, column title) of the report card shown in study.md
COLUMNS = (("coseg", "jaccard", "coseg J"), ("saliency", "jaccard", "saliency J"),
           ("knn", "cls_top1", "k-NN CLS top-1"))
TAIL = 10  # steps at the end of a run whose loss and entropy are averaged (one batch is noisy)
# the training diagnostics of a log record: DINO's teacher entropy and KL, BYOL's normalised output std
DIAGNOSTICS = ("loss", "teacher_entropy", "kl", "output_std")


@dataclass
class Variant:
    """One recipe of the study: a name and the pretrain options it adds to the base recipe."""

    name: str
    flags: list[str]
    minutes: float = math.nan
    steps: int = 0
    out_dim: int = 0
    method: str = "dino"
    final: dict[str, float] = field(default_factory=dict)  # loss and the DIAGNOSTICS of its method at the end
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value


def parse_variant(text: str) -> Variant:
    """``NAME=FLAGS`` → Variant; exits with a one-line message naming the option when it cannot work."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        sys.exit(f"--variant {text!r}: write NAME=FLAGS, NAME of letters, digits, '_', '.', '-' "
                 f"(e.g. \"dim256=--out-dim 256\"; \"base=\" for the base recipe)")
    args = shlex.split(flags)
    reserved = [a for a in args if a.split("=")[0] in RESERVED]
    if reserved:
        sys.exit(f"--variant {name}: {', '.join(reserved)} is set by the study for every variant; leave it out")
    return Variant(name, args)


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run a command with this checkout first on the import path; its output goes to ``log`` when given."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("+", shlex.join(cmd), flush=True)
    if log is None:
        done = subprocess.run(cmd, env=env, cwd=REPO)
    else:
        with open(log, "w") as f:
            done = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        where = f"; its output is in {log}" if log is not None else ""
        sys.exit(f"{shlex.join(cmd[1:4])} ... failed (exit {done.returncode}){where}; the finished runs stay in "
                 f"OUT: rerun with --keep-done to skip them")


def pretrain_command(data: Path, base: list[str], variant: Variant, run_dir: Path, max_steps: int,
                     seed: int) -> list[str]:
    """The ``python -m pretrain`` command line of one variant."""
    return [sys.executable, "-m", "pretrain", str(data), *base, *variant.flags, "--out", str(run_dir),
            "--max-steps", str(max_steps), "--seed", str(seed)]


def end_of_run(run_dir: Path, tail: int = TAIL) -> tuple[dict[str, Any], dict[str, float]]:
    """The last step record of a run's log.jsonl and the means of its last ``tail`` steps' loss and
    diagnostics (teacher entropy and KL for DINO, normalised output std for BYOL)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r][-tail:]
    if not steps:
        sys.exit(f"{run_dir / 'log.jsonl'}: no training step was logged")
    final = {key: sum(r[key] for r in steps) / len(steps) for key in DIAGNOSTICS if key in steps[-1]}
    return steps[-1], final


def link_weights(variants: list[Variant], out: Path) -> list[Path]:
    """``OUT/weights/NAME.pth`` → ``OUT/runs/NAME/teacher_backbone.pth`` (the report card labels a weights
    file with its stem)."""
    folder = out / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for v in variants:
        link = folder / f"{v.name}.pth"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / "runs" / v.name / "teacher_backbone.pth")
        links.append(link)
    return links


def evaluate_command(weights: list[Path], report_dir: Path, args: argparse.Namespace) -> list[str]:
    """One ``vitdense evaluate`` call that grades every variant beside one random floor."""
    cmd = [sys.executable, "-m", "vitdense", "evaluate", "--weights", str(weights[0])]
    for w in weights[1:]:
        cmd += ["--compare", str(w)]
    cmd += ["--tasks", args.tasks, "--out", str(report_dir), "--load-size", str(args.load_size),
            "--knn-size", str(args.knn_size), "--device", args.device, "--seed", str(args.seed)]
    if args.eval_data is not None:
        cmd += ["--data", str(args.eval_data)]
    if args.quick:
        cmd.append("--quick")
    return cmd


def _cell(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1f}" if metric.endswith("top1") else f"{value:.3f}"


def study_markdown(study: dict[str, Any]) -> str:
    """The study's table: one row per variant and one for the floor, best score of each column in bold."""
    variants = [Variant(**v) for v in study["variants"]]
    rows = variants + [Variant(FLOOR, [], scores=study["floor"])]
    best = {}
    for task, metric, _ in COLUMNS:
        values = [v.scores.get(task, {}).get(metric, math.nan) for v in variants]
        finite = [x for x in values if math.isfinite(x)]
        best[(task, metric)] = max(finite) if finite else None
    head = ["variant", "flags"] + [title for _, _, title in COLUMNS] + \
        ["loss", "teacher entropy (of ln K)", "KL", "output std", "minutes"]
    lines = ["# Recipe study", "",
             f"Data `{study['data']}`; {study['max_steps']} steps each, seed {study['seed']}. Base recipe: "
             f"`{shlex.join(study['base'])}`.", "",
             f"Scores: one `vitdense evaluate --tasks {study['tasks']}` call{' (--quick)' if study['quick'] else ''} "
             f"(report in `report/`), the floor a randomly initialised backbone of the same architecture. "
             f"Loss, teacher entropy and KL(teacher ‖ student): means of the last {TAIL} steps; a teacher "
             f"entropy near ln K with a KL near 0 is the uniform collapse of DINO's Fig. 7. BYOL's loss is "
             f"2 - 2 cos (0 to 4, not comparable with DINO's cross-entropy); its output std (of z/||z||, "
             f"times sqrt P) is about 1 for outputs spread like random directions, 0 when collapsed.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in rows:
        cells = [v.name, f"`{shlex.join(v.flags)}`" if v.flags else ("" if v.name == FLOOR else "(base recipe)")]
        for task, metric, _ in COLUMNS:
            value = v.scores.get(task, {}).get(metric)
            text = _cell(metric, value)
            cells.append(f"**{text}**" if v.name != FLOOR and value is not None and value == best[(task, metric)]
                         else text)
        if v.name == FLOOR:
            cells += ["", "", "", "", ""]
        else:
            f = v.final
            cells += [f"{f['loss']:.3f}",
                      f"{f['teacher_entropy']:.2f} ({math.log(v.out_dim):.2f})" if "teacher_entropy" in f else "–",
                      f"{f['kl']:.3f}" if "kl" in f else "–",
                      f"{f['output_std']:.3f}" if "output_std" in f else "–", f"{v.minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    train_minutes = sum(v.minutes for v in variants)
    lines += ["", f"Training {train_minutes:.1f} minutes in all, evaluation {study['eval_minutes']:.1f} minutes "
                  f"(wall clock: the numbers move with the machine's load). A mask of the whole image scores co-segmentation Jaccard "
                  f"{study['whole_image_jaccard']:.3f}; always answering the most common class, k-NN top-1 "
                  f"{study['knn_majority_top1']:.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s DATA --out OUT --max-steps N [--variant NAME=FLAGS ...] "
                                           "[options] -- BASE_RECIPE",
                                     epilog="BASE_RECIPE: the `python -m pretrain` options every variant shares.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", type=Path, help="folder of training images")
    parser.add_argument("--out", type=Path, required=True, help="study folder")
    parser.add_argument("--max-steps", type=int, required=True, help="training steps of every variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a recipe: pretrain options added to the base recipe (repeatable, in table order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run and of the report card")
    parser.add_argument("--keep-done", action="store_true",
                        help="do not retrain a variant whose run in OUT finished with the same command")
    parser.add_argument("--tasks", default="coseg,saliency,knn", help="report-card tasks")
    parser.add_argument("--quick", action="store_true", help="grade on the report card's quick subset")
    parser.add_argument("--eval-data", type=Path, default=None, help="report-card data folder (its default)")
    parser.add_argument("--load-size", type=int, default=224, help="report card: image size of coseg/saliency")
    parser.add_argument("--knn-size", type=int, default=128, help="report card: image size of k-NN")
    parser.add_argument("--device", default="cpu", help="device of the report card")
    argv = sys.argv[1:] if argv is None else list(argv)
    # the base recipe follows `--` (split off here: argparse would read it as the study's own options)
    base = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    reserved = [a for a in base if a.split("=")[0] in RESERVED]
    if reserved:
        sys.exit(f"base recipe: {', '.join(reserved)} is set by the study; leave it out")
    variants = [parse_variant(text) for text in args.variant] or [Variant("base", [])]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        sys.exit(f"--variant: the names must differ ({', '.join(names)})")
    if args.max_steps < 1:
        sys.exit("--max-steps must be at least 1")
    data, out = args.data.resolve(), args.out.resolve()
    if not data.is_dir():
        sys.exit(f"{args.data}: not a folder of training images")

    from vitdense import save_json

    for v in variants:
        run_dir = out / "runs" / v.name
        cmd = pretrain_command(data, base, v, run_dir, args.max_steps, args.seed)
        done_file = run_dir / "study_run.json"  # written once the run has finished: its command and minutes
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        if args.keep_done and done.get("command") == cmd[1:]:
            print(f"{v.name}: kept the finished run in {run_dir}", flush=True)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            done_file.unlink(missing_ok=True)
            t0 = time.perf_counter()
            run(cmd, log=run_dir / "output.txt")
            done = {"command": cmd[1:], "minutes": (time.perf_counter() - t0) / 60}
            save_json(done_file, done)
        v.minutes = done["minutes"]
        last, v.final = end_of_run(run_dir)
        config = json.loads((run_dir / "config.json").read_text())
        v.method = config.get("method", "dino")
        v.steps = last["step"]
        v.out_dim = config["projector_dim"] if v.method == "byol" else config["out_dim"]
        span = config["momentum_teacher_end"] - config["momentum_teacher"]
        if span and (config["momentum_teacher_end"] - last["momentum"]) / span > 0.01:
            print(f"warning: {v.name} stopped mid-schedule (teacher momentum {last['momentum']:.4f} at step "
                  f"{v.steps}): give --epochs that end at --max-steps", flush=True)
        shown = (f"teacher entropy {v.final['teacher_entropy']:.2f} of ln K = {math.log(v.out_dim):.2f}"
                 if "teacher_entropy" in v.final else f"output std {v.final['output_std']:.3f}")
        print(f"{v.name}: {v.steps} steps in {v.minutes:.1f} min, loss {v.final['loss']:.3f}, {shown}", flush=True)

    t0 = time.perf_counter()
    report_dir = out / "report"
    run(evaluate_command(link_weights(variants, out), report_dir, args))
    eval_minutes = (time.perf_counter() - t0) / 60
    report = json.loads((report_dir / "report.json").read_text())
    for v in variants:
        v.scores = report["scores"][v.name]
    study = {"data": str(data), "base": base, "max_steps": args.max_steps, "seed": args.seed, "tasks": args.tasks,
             "quick": args.quick, "variants": [asdict(v) for v in variants], "floor": report["scores"][FLOOR],
             "eval_minutes": eval_minutes,
             "whole_image_jaccard": report["data"].get("whole_image_jaccard", math.nan),
             "knn_majority_top1": report["data"].get("knn_majority_top1", math.nan)}
    save_json(out / "study.json", study)
    tmp = out / "study.md.tmp"
    tmp.write_text(study_markdown(study))
    os.replace(tmp, out / "study.md")
    print(study_markdown(study), flush=True)
    print(f"wrote {out / 'study.md'} and {out / 'study.json'}", flush=True)


if __name__ == "__main__":
    main()
