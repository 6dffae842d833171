"""Training records: a JSON-lines log (one dict per logged step) and a PNG of its curves."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from vitdense.backbones import atomic_write

# Curves drawn by plot_curves, in panel order: (record key, title). Entropy and KL together show collapse:
# uniform collapse drives the teacher entropy to log K, one-prototype collapse drives it to 0; either
# way KL(P_t || P_s) goes to 0 (Caron et al. 2021, Sec. 5.3, Fig. 7).
PANELS = (("loss", "loss H(P_t, P_s)"), ("teacher_entropy", "teacher entropy h(P_t)"),
          ("kl", "KL(P_t || P_s)"), ("lr", "learning rate"), ("weight_decay", "weight decay"),
          ("momentum", "teacher momentum"), ("teacher_temp", "teacher temperature"),
          ("output_std", "BYOL: std of z/||z|| x sqrt(P)"), ("knn_top1", "k-NN top-1 (%)"))


def collapse_warning(record: dict[str, Any]) -> str | None:
    """A one-line warning when a log record shows a collapsed run, else None.

    BYOL (``output_std``, see :func:`pretrain.byol.normalised_std`): below
    :data:`pretrain.byol.COLLAPSE_STD` every image gets nearly the same output.
    """
    from .byol import COLLAPSE_STD

    std = record.get("output_std")
    if std is not None and std < COLLAPSE_STD:
        return (f"collapse: the online outputs' normalised std is {std:.4f} (about 1 when they spread, 0 when "
                f"every image gets the same output); lower --lr or raise --momentum-teacher")
    return None


class JsonlLog:
    """Append-only JSON-lines log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write
                if record.get("step", math.inf) <= resume_step:
                    self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """One panel per curve of :data:`PANELS` against the global step, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, name) for key, name in PANELS if any(key in r for r in records)]
    if any("output_std" in r for r in records):  # a BYOL run: its loss is another one
        panels = [(key, "loss 2 - 2 cos(q, sg(z'))" if key == "loss" else name) for key, name in panels]
    if not panels:
        return
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
