"""Every hyper-parameter of DINO (and BYOL) pretraining, with its default and a one-line help, in one dataclass.

The defaults are those of facebookresearch/dino (``main_dino.py``) and of the paper's ViT-S/16 recipe
(Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"). Both command lines
(``vitdense pretrain`` and ``python -m pretrain``) are derived from :class:`PretrainConfig`, so an option
added here appears in both.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from vitdense.errors import ConfigError

# Short names → timm architecture prefixes; the patch size and 224 are appended.
SHORT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")
METHODS = ("dino", "byol")
# Options that mean something for one method only: given for the other, they are a ConfigError.
METHOD_ONLY = {
    "dino": ("out_dim", "hidden_dim", "bottleneck_dim", "norm_last_layer", "student_temp", "warmup_teacher_temp",
             "teacher_temp", "warmup_teacher_temp_epochs", "center_momentum", "freeze_last_layer", "local_size",
             "local_scale", "local_crops"),
    "byol": ("projector_hidden_dim", "projector_dim"),
}
# A method's own defaults where they differ from the dataclass's (DINO's): BYOL trains on two views cropped
# at 8-100 % of the image (Grill et al. 2020, Table 6).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"dino": {}, "byol": {"local_crops": 0, "global_scale": (0.08, 1.0)}}

# --arch when none is given and there is no --init (whose weights bring their own architecture).
DEFAULT_ARCH = "vit_small"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class PretrainConfig:
    """DINO self-distillation settings. Schedules are defined per global step (all processes together)."""

    data_dir: str = _opt("", "Folder tree of training images (no labels needed).", positional=True)
    out: str = _opt("runs/dino", "Run folder: checkpoint.pth, teacher_backbone.pth, log.jsonl, curves.png.")

    # ----- model
    method: str = _opt("dino", "dino: self-distillation with multi-crop (Caron et al. 2021); byol: an online network "
                               "with a predictor regresses the EMA target's projection of the other view (Grill et "
                               "al. 2020; two views, its own crop scale 0.08-1 unless --global-scale is given).",
                       choices=METHODS)
    arch: str = _opt("", f"vit_tiny/vit_small/vit_base, or any timm ViT name (vit_small_patch8_224, ...); "
                         f"not given: {DEFAULT_ARCH}, or with --init the weights' own.")
    patch_size: int = _opt(0, "Patch size (0 = from the timm name, 16 for short names).")
    init: str = _opt("", "Start both backbones from these weights (a name from `vitdense models`, an official "
                         "DINO/DINOv2 file or a pretrain export; the DINO head starts fresh). The "
                         "architecture is the weights' own.")
    img_size: int = _opt(0, "Size of the position-embedding grid in pixels (0 = --global-size).")
    drop_path: float = _opt(0.1, "Stochastic depth rate of the student (the teacher has none).")
    out_dim: int = _opt(65536, "Output dimension K of the DINO head.")
    hidden_dim: int = _opt(2048, "Hidden width of the DINO head's MLP.")
    bottleneck_dim: int = _opt(256, "Bottleneck width of the DINO head (L2-normalised).")
    norm_last_layer: bool = _opt(True, "Fix the norm of the head's weight-normalised last layer to 1.")
    projector_hidden_dim: int = _opt(4096, "BYOL: hidden width of the projector and predictor MLPs.")
    projector_dim: int = _opt(256, "BYOL: output dimension of the projector and predictor.")

    # ----- loss and teacher
    student_temp: float = _opt(0.1, "Student softmax temperature.")
    warmup_teacher_temp: float = _opt(0.04, "Teacher temperature at step 0.")
    teacher_temp: float = _opt(0.07, "Teacher temperature after the warm-up.")
    warmup_teacher_temp_epochs: float = _opt(30.0, "Epochs of the linear teacher-temperature warm-up.")
    center_momentum: float = _opt(0.9, "Momentum of the teacher-output centre.")
    momentum_teacher: float = _opt(0.996, "Teacher EMA momentum at step 0 (cosine to --momentum-teacher-end).")
    momentum_teacher_end: float = _opt(1.0, "Teacher EMA momentum at the last step.")

    # ----- optimisation
    epochs: int = _opt(100, "Training epochs.")
    max_steps: int = _opt(0, "Stop after this many global steps (0 = all epochs); schedules still span "
                             "--epochs.")
    time_limit: float = _opt(0.0, "Stop on the clock: seconds from the start of the run (image decoding included) "
                                  "by which the last checkpoint and export are written (0 = off). The schedules "
                                  "are fitted to the steps that fit, measured on the first steps.")
    batch_size: int = _opt(64, "Global batch size (split evenly across processes).")
    lr: float = _opt(0.0005, "Peak learning rate for a global batch of 256 (scaled linearly with the batch).")
    min_lr: float = _opt(1e-6, "Learning rate at the end of the cosine schedule.")
    warmup_epochs: float = _opt(10.0, "Epochs of linear learning-rate warm-up.")
    weight_decay: float = _opt(0.04, "Weight decay at step 0 (not on biases and norms).")
    weight_decay_end: float = _opt(0.4, "Weight decay at the last step (cosine schedule).")
    clip_grad: float = _opt(3.0, "Per-parameter gradient-norm clipping (0 = off).")
    freeze_last_layer: int = _opt(1, "Epochs during which the head's last layer gets no update.")

    # ----- multi-crop augmentation
    global_size: int = _opt(224, "Side of the two global crops in pixels.")
    local_size: int = _opt(96, "Side of the local crops in pixels.")
    local_crops: int = _opt(8, "Number of local crops (10 in the paper's best recipe; 0 = none).")
    global_scale: tuple[float, float] = _opt((0.4, 1.0), "Area range of the global crops.")
    local_scale: tuple[float, float] = _opt((0.05, 0.4), "Area range of the local crops.")
    repeat: int = _opt(1, "Passes over the images per epoch (small data sets: epochs long enough for the "
                          "schedules and checkpoints).")
    cutouts: str = _opt("", "Folder of photographic cut-outs (PNG/WebP with alpha): a share of the samples "
                            "(--composite-p) is a new composite of them on a background photo (off when empty).")
    backgrounds: str = _opt("", "Folder of background photos for the composites (default: the training images).")
    composite_p: float = _opt(0.5, "With --cutouts: the share of samples that are new composites.")
    gpu_augment: str = _opt("auto", "Make the crops on the device, the loader only decodes (auto: on CUDA).",
                            choices=("auto", "on", "off"))
    source_size: int = _opt(0, "Longer side images are shrunk to for --gpu-augment (0 = 1.5 x --global-size).")
    cache_mb: int = _opt(0, "Decoded images each loader worker keeps in memory, in MiB (small data sets).")
    resident_mb: int = _opt(2048, "With --gpu-augment: when every decoded source image fits in this many MiB, "
                                  "decode them once and keep them on the device (0 = never).")

    # ----- system
    device: str = _opt("auto", "cpu, cuda or auto (under torchrun: cuda:LOCAL_RANK).")
    precision: str = _opt("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.", choices=("auto", "bf16", "fp32"))
    compile: bool = _opt(False, "torch.compile the student and teacher.")
    workers: int = _opt(4, "Data-loader worker processes per training process.")
    seed: int = _opt(0, "Random seed (data order, crops, initialisation, drop-path).")
    resume: str = _opt("", "Checkpoint (or run folder) to continue from, with its saved settings (DATA_DIR "
                           "included); options given as well override them, except the model's.")
    save_every: int = _opt(0, "Also checkpoint every N steps (0 = only at the end of epochs).")
    save_every_epochs: int = _opt(1, "Checkpoint at the end of every N-th epoch (and of the last).")
    log_every: int = _opt(1, "Write a log.jsonl record every N steps.")
    knn_data: str = _opt("", "Labelled folder (one subfolder per class; train/ and val/ optional) "
                             "for k-NN evaluation: top-1, and top-5 with more than 5 classes.")
    knn_every: int = _opt(5, "Run the k-NN evaluation every N epochs (and at the end).")
    knn_k: int = _opt(20, "Neighbours of the k-NN evaluation.")
    knn_temp: float = _opt(0.07, "Temperature of the k-NN weighted vote.")

    # ------------------------------------------------------------------ derived values
    def timm_arch(self) -> tuple[str, dict[str, Any]]:
        """The timm architecture name and the constructor overrides (patch_size, img_size)."""
        arch = self.arch or DEFAULT_ARCH
        match = re.search(r"_patch(\d+)", arch)
        if arch in SHORT_ARCHS:
            patch = self.patch_size or 16
            arch = f"{arch}_patch{patch}_224"
        elif match:
            patch = self.patch_size or int(match.group(1))
        elif arch.startswith(("vit_", "deit")):
            patch = self.patch_size or 16
        else:
            raise ConfigError(f"--arch {self.arch}: use vit_tiny, vit_small, vit_base or a timm ViT name")
        return arch, dict(img_size=self.img_size or self.global_size, patch_size=patch)

    @classmethod
    def for_method(cls, method: str, **values: Any) -> "PretrainConfig":
        """The config of ``method`` with that method's own defaults (METHOD_DEFAULTS) for the fields not in
        ``values``: ``PretrainConfig.for_method("byol", data_dir="photos", arch="vit_tiny")``."""
        return cls(method=method, **{**METHOD_DEFAULTS.get(method, {}), **values})

    def foreign_options(self) -> list[str]:
        """The fields set away from their default that mean nothing for this config's method."""
        own = METHOD_DEFAULTS.get(self.method, {})
        return [name for other, names in METHOD_ONLY.items() if other != self.method for name in names
                if getattr(self, name) != own.get(name, _FIELDS[name].default)]

    def validate(self) -> None:
        """ConfigError naming the option when a value cannot work."""
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method}: use {' or '.join(METHODS)}")
        foreign = self.foreign_options()
        if foreign:
            raise ConfigError(method_clash(self.method, foreign))
        _, kwargs = self.timm_arch()
        patch = kwargs["patch_size"]
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.local_crops >= 0, "--local-crops must be 0 or more"),
            (self.global_size >= patch and self.global_size % patch == 0,
             f"--global-size {self.global_size} must be a multiple of the patch size {patch}"),
            (self.local_crops == 0 or (self.local_size >= patch and self.local_size % patch == 0),
             f"--local-size {self.local_size} must be a multiple of the patch size {patch}"),
            (0 < self.global_scale[0] <= self.global_scale[1] <= 1, "--global-scale needs 0 < min <= max <= 1"),
            (0 < self.local_scale[0] <= self.local_scale[1] <= 1, "--local-scale needs 0 < min <= max <= 1"),
            (self.precision in ("auto", "bf16", "fp32"), f"--precision {self.precision}: use auto, bf16 or fp32"),
            (self.workers >= 0, "--workers must be 0 or more"),
            (self.repeat >= 1, "--repeat must be at least 1"),
            (self.cache_mb >= 0, "--cache-mb must be 0 or more"),
            (self.resident_mb >= 0, "--resident-mb must be 0 or more"),
            (self.save_every_epochs >= 1, "--save-every-epochs must be at least 1"),
            (self.gpu_augment in ("auto", "on", "off"), f"--gpu-augment {self.gpu_augment}: use auto, on or off"),
            (self.source_size == 0 or self.source_size >= self.global_size,
             f"--source-size {self.source_size} must be 0 or at least --global-size {self.global_size}"),
            (self.out_dim >= 1, "--out-dim must be at least 1"),
            (self.projector_hidden_dim >= 1 and self.projector_dim >= 1,
             "--projector-hidden-dim and --projector-dim must be at least 1"),
            (self.knn_k >= 1, "--knn-k must be at least 1"),
            (0 <= self.composite_p <= 1, "--composite-p must be between 0 and 1"),
            (not self.backgrounds or self.cutouts, "--backgrounds needs --cutouts (the composites' objects)"),
            (self.time_limit >= 0, "--time-limit must be 0 (off) or a number of seconds"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def make_paths_absolute(self) -> None:
        """Turn the folder and file options into absolute paths (from the current folder), so a run's records
        (config.json, checkpoints, exports) mean the same wherever they are read or resumed from. ``init``
        only when it names an existing file (otherwise it is a model name)."""
        for name in ("data_dir", "out", "knn_data", "resume"):
            if getattr(self, name):
                setattr(self, name, os.path.abspath(getattr(self, name)))
        if self.init and Path(self.init).exists():
            self.init = os.path.abspath(self.init)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PretrainConfig":
        """Config from a dict (e.g. the one stored in a checkpoint); unknown keys are ignored."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(names[k].default, tuple) else v)
                  for k, v in values.items() if k in names}
        return cls(**kwargs)


# Fields whose change makes a checkpoint incompatible with the run that resumes it.
MODEL_FIELDS = ("method", "arch", "patch_size", "img_size", "out_dim", "hidden_dim", "bottleneck_dim",
                "norm_last_layer", "projector_hidden_dim", "projector_dim", "global_size")


def method_clash(method: str, names: list[str]) -> str:
    """The one-line message for options of another method given with ``--method method``."""
    opts = ", ".join("--" + n.replace("_", "-") for n in names)
    why = {"byol": "BYOL trains two views through a projector and predictor, with no DINO head, temperatures "
                   "or local crops",
           "dino": "they size BYOL's projector and predictor"}[method]
    return f"{opts} {'means' if len(names) == 1 else 'mean'} nothing for --method {method} ({why}); leave " \
           f"{'it' if len(names) == 1 else 'them'} out"


def apply_method(values: dict[str, Any], explicit: set[str] | None) -> dict[str, Any]:
    """Options of a command line with the chosen method's own defaults for those not given (``explicit``;
    None: those that differ from the dataclass default); ConfigError when an option of the other method is
    given (``--local-crops 0`` is fine for BYOL)."""
    method = values.get("method") or "dino"
    own = METHOD_DEFAULTS.get(method, {})

    def norm(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    if explicit is None:
        explicit = {k for k, v in values.items() if k in _FIELDS and v is not None
                    and norm(v) != _FIELDS[k].default}
    foreign = [name for other, names in METHOD_ONLY.items() if other != method for name in names
               if name in explicit and values.get(name) is not None and norm(values[name]) != own.get(name, object())]
    if foreign:
        raise ConfigError(method_clash(method, foreign))
    return {**values, **{k: v for k, v in own.items() if k not in explicit}}


_FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def config_fields() -> list[dataclasses.Field]:
    """The option fields in declaration order (what both command lines are built from)."""
    return list(dataclasses.fields(PretrainConfig))


def option_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def build_argparser(prog: str = "python -m pretrain") -> argparse.ArgumentParser:
    """An argparse parser with one option per :class:`PretrainConfig` field (the data folder positional)."""
    parser = argparse.ArgumentParser(prog=prog, description="DINO self-distillation pretraining of a ViT.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in config_fields():
        help_text = f.metadata["help"]
        if f.metadata.get("positional"):  # optional with --resume (the run's own folder is the default)
            parser.add_argument(f.name, nargs="?", default="", help=help_text)
        elif isinstance(f.default, bool):
            parser.add_argument(option_name(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        elif isinstance(f.default, tuple):
            parser.add_argument(option_name(f), dest=f.name, type=float, nargs=2, default=f.default,
                                metavar=("MIN", "MAX"), help=help_text)
        else:
            parser.add_argument(option_name(f), dest=f.name, type=type(f.default), default=f.default,
                                choices=f.metadata.get("choices"), help=help_text)
    return parser


def explicit_options(argv: list[str]) -> set[str]:
    """The config fields given on an argparse command line (parsed once more with every default None)."""
    blank = build_argparser()
    blank.set_defaults(**{f.name: None for f in config_fields()})
    return {k for k, v in vars(blank.parse_args(argv)).items() if v is not None}


def config_from_args(args: argparse.Namespace | dict[str, Any], explicit: set[str] | None = None
                     ) -> PretrainConfig:
    """PretrainConfig from parsed options (argparse namespace or click's keyword dict).

    With ``--resume``, the run's saved settings are the starting point and only the options in ``explicit``
    (those typed on the command line; None = all) replace them: see :func:`resume_config`.
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if values.get("resume"):
        return resume_config(values, set(values) if explicit is None else explicit)
    if not values.get("data_dir"):
        raise ConfigError("DATA_DIR: give the folder of training images (or --resume RUN to continue a run)")
    cfg = PretrainConfig.from_dict(apply_method(values, explicit))
    cfg.make_paths_absolute()
    return cfg


def resume_config(values: dict[str, Any], explicit: set[str]) -> PretrainConfig:
    """The settings of a resumed run: those saved in its checkpoint, with the explicitly given options
    (``explicit``) on top. A model option that differs from the saved one (MODEL_FIELDS) is a one-line
    ConfigError; the others (epochs, workers, data folder, ...) simply override. The run continues in the
    folder of the checkpoint, wherever it is resumed from, unless ``--out`` is given."""
    from .checkpoint import load_checkpoint, resolve_resume

    path = resolve_resume(values["resume"])
    saved = PretrainConfig.from_dict(load_checkpoint(path, mmap=True)["config"]).to_dict()
    given = PretrainConfig.from_dict({k: v for k, v in values.items() if v is not None}).to_dict()
    explicit = {k for k in explicit if k in given and k != "resume" and values.get(k) is not None}
    if "data_dir" in explicit and not values.get("data_dir"):
        explicit.discard("data_dir")
    clashes = [f"{option_name(_FIELDS[k])} {given[k]!r} (the run has {saved[k]!r})"
               for k in MODEL_FIELDS if k in explicit and given[k] != saved[k]]
    if clashes:
        raise ConfigError(f"{path}: cannot resume with " + ", ".join(clashes) + ": a resumed run keeps its model "
                          "options; leave them out, or start a new run with another --out")
    apply_method({**saved, **{k: given[k] for k in explicit}}, explicit)  # options of the other method: error
    merged = {**saved, **{k: given[k] for k in explicit}, "resume": str(values["resume"])}
    if "out" not in explicit:  # not the saved "out": older runs saved it relative to where they started
        merged["out"] = str(path.parent)
    cfg = PretrainConfig.from_dict(merged)
    cfg.make_paths_absolute()
    return cfg
