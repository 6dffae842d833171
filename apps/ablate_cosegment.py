"""Measure each difference between vitdense's co-segmentation and dino-vit-features' on the report card.

Runs the report card's co-segmentation task (``vitdense evaluate --tasks coseg``: 8 groups of 6
photographic cut-outs pasted on photos, Jaccard against their alpha mattes) with dino-vit-features'
pipeline ("reference": GrabCut refinement, half-size saliency pass, elbow keeps the stalling k, objective
over all descriptors, sample interval as given) and with each step changed, one at a time, to the other
choice; each backbone's descriptors are extracted once. The backbones: ``--model``/``--weights`` and any
``--compare`` (a weights file or model name), plus the random initialisation of the first one's
architecture. Writes OUT/ablation.json and OUT/ablation.md and prints the table.

    python apps/ablate_cosegment.py --out runs/ablation                       # the default backbone
    python apps/ablate_cosegment.py --weights teacher.pth --compare vitdense_vits8 --out runs/ablation
    python apps/ablate_cosegment.py --quick --out /tmp/ablation               # 2 groups, for a smoke test
    python apps/ablate_cosegment.py --seeds 3 --variants "--min-sample 1000" --out runs/noise   # k-means spread
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import vitdense

# dino-vit-features' cosegmentation.py, step by step, in vitdense's option names
REFERENCE = {"refine": "grabcut", "coseg_saliency": "low", "elbow_k": "after", "elbow_objective": "all",
             "min_sample": 0}
# the other choice of each step (vitdense's choices before the defaults were measured)
OTHER = {"refine": "crf", "coseg_saliency": "full", "elbow_k": "before", "elbow_objective": "heldout",
         "min_sample": 1000}
FLAGS = {"refine": "--refine", "coseg_saliency": "--saliency-res", "elbow_k": "--elbow-k",
         "elbow_objective": "--elbow-objective", "min_sample": "--min-sample"}


def variants() -> dict[str, dict]:
    """The reference, each step changed alone, no refinement at all, and every step changed."""
    out = {"reference": dict(REFERENCE)}
    for key, value in OTHER.items():
        out[f"{FLAGS[key]} {value}"] = {**REFERENCE, key: value}
    out["--refine none"] = {**REFERENCE, "refine": "none"}
    out["all changed"] = dict(OTHER)
    return out


def pick(names: list[str] | None) -> dict[str, dict]:
    """The named variants (all by default), the reference first; an unknown name is a ConfigError."""
    every = variants()
    unknown = [n for n in names or [] if n not in every]
    if unknown:
        raise vitdense.ConfigError(f"unknown variant {unknown[0]!r}: choose from {', '.join(map(repr, every))}")
    return {n: every[n] for n in every if names is None or n == "reference" or n in names}


def candidate(spec: str | None, weights: str | None, device: str) -> vitdense.Candidate:
    if weights is not None or (spec is not None and Path(spec).is_file()):
        path = weights or spec
        return vitdense.Candidate(Path(path).stem, vitdense.ViTExtractor(stride=4, weights=path, device=device),
                                  f"weights file {path}")
    ext = vitdense.ViTExtractor(spec, stride=4, device=device)
    return vitdense.Candidate(ext.model_type, ext, f"model {ext.model_type}")


def aggregate(table: dict[str, dict[str, dict[str, float]]], names: list[str], seeds: int
              ) -> dict[str, dict[str, dict[str, float]]]:
    """label → variant → mean of each score over the k-means seeds, plus jaccard_std (0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, runs in table.items():
        out[label] = {}
        for name in names:
            per_seed = [runs[f"{name} @{s}"] for s in range(seeds)]
            means = {key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]}
            out[label][name] = {**means, "jaccard_std": float(np.std([r["jaccard"] for r in per_seed]))}
    return out


def markdown(scores: dict[str, dict[str, dict[str, float]]], seeds: int, seconds: float) -> str:
    labels = list(scores)
    names = list(next(iter(scores.values())))
    lines = ["| variant | " + " | ".join(f"{label}: Jaccard (prec., rec., k)" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for name in names:
        cells = []
        for label in labels:
            sc = scores[label][name]
            spread = f" ± {sc['jaccard_std']:.3f}" if seeds > 1 else ""
            delta = "" if name == "reference" else f" ({sc['jaccard'] - scores[label]['reference']['jaccard']:+.3f})"
            cells.append(f"{sc['jaccard']:.3f}{spread}{delta}; {sc['precision']:.2f}, {sc['recall']:.2f}, "
                         f"{sc['mean_k']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    seed_note = f"mean ± standard deviation over {seeds} k-means seeds; " if seeds > 1 else ""
    lines.append(f"Co-segmentation task of the report card, mean over groups of the per-image Jaccard "
                 f"({seed_note}in brackets the change against the reference pipeline). {seconds / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="backbone name (default: vitdense's default)")
    parser.add_argument("--weights", default=None, help="weights file of the backbone")
    parser.add_argument("--compare", action="append", default=[], help="another weights file or model name")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=None, help="evaluation data (default: vitdense's cache, built if absent)")
    parser.add_argument("--quick", action="store_true", help="the first 2 groups only")
    parser.add_argument("--seeds", type=int, default=1, help="k-means seeds per variant (mean and spread)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="a subset of the variants (default: all; 'reference' is always run)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        data = Path(args.data) if args.data else vitdense.eval_data_dir()
        if not (data / "manifest.json").is_file():
            vitdense.prepare_eval_data(data)
        candidates = [candidate(args.model, args.weights, args.device)]
        candidates += [candidate(spec, None, args.device) for spec in args.compare]
        chosen = pick(args.variants)
        runs = {f"{name} @{seed}": {**options, "seed": seed} for name, options in chosen.items()
                for seed in range(args.seeds)}
        start = time.perf_counter()
        table = vitdense.compare_coseg_settings(candidates, data, runs, vitdense.EvalSettings(quick=args.quick))
    except vitdense.VitdenseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    scores = aggregate(table, list(chosen), args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(scores, args.seeds, seconds)
    (args.out / "ablation.md").write_text(text)
    (args.out / "ablation.json").write_text(json.dumps(
        {"variants": chosen, "seeds": args.seeds, "scores": scores, "per_seed": table, "seconds": seconds,
         "quick": args.quick, "backbones": {c.label: c.source for c in candidates}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
