"""``vitdense pretrain DATA_DIR --out RUN ...``: DINO pretraining, options derived from PretrainConfig."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..cli import main


def _config_options(fn: Callable) -> Callable:
    """One click option per PretrainConfig field, with its default and help (the data folder an argument)."""
    from pretrain.config import config_fields, option_name

    for f in reversed(config_fields()):
        if f.metadata.get("positional"):  # optional with --resume: the run's saved one
            fn = click.argument(f.name, type=click.Path(exists=False, file_okay=False), required=False,
                                default="")(fn)
        elif isinstance(f.default, bool):
            flag = option_name(f)
            fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True,
                              help=f.metadata["help"])(fn)
        elif isinstance(f.default, tuple):
            fn = click.option(option_name(f), f.name, type=float, nargs=2, default=f.default, show_default=True,
                              metavar="MIN MAX", help=f.metadata["help"])(fn)
        else:
            kind: Any = click.Choice(f.metadata["choices"]) if f.metadata.get("choices") else type(f.default)
            fn = click.option(option_name(f), f.name, type=kind, default=f.default, show_default=True,
                              help=f.metadata["help"])(fn)
    return fn


@main.command("pretrain")
@_config_options
def pretrain_command(**options: Any) -> None:
    """Train a ViT with DINO self-distillation (or BYOL: --method byol) on the images under DATA_DIR (no labels
    needed).

    Writes OUT/checkpoint.pth, OUT/teacher_backbone.pth (use with --weights in every other command),
    OUT/log.jsonl and OUT/curves.png. `vitdense pretrain --resume OUT` continues a run with its saved
    settings; options given as well override them (model options must stay the same). Several processes:
    torchrun -m pretrain.
    """
    import logging

    from click.core import ParameterSource

    from pretrain.config import config_from_args
    from pretrain.train import train

    ctx = click.get_current_context()
    explicit = {name for name in options
                if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    logging.getLogger("pretrain").setLevel(logging.INFO)
    result = train(config_from_args(options, explicit))
    trained = result.steps - result.start_step
    since = f" (steps {result.start_step} to {result.steps}, resumed)" if result.start_step else ""
    click.echo(f"trained {trained} steps{since}, last loss {result.last_loss:.4f}, {result.skipped_files} "
               f"unreadable file(s) skipped")
    click.echo(f"teacher backbone: {result.export} (vitdense ... --weights {result.export})")
    click.echo(f"checkpoint: {result.checkpoint}, log: {result.log}, curves: {result.plot}")
