"""``python -m pretrain DATA_DIR ...`` and ``torchrun --nproc-per-node N -m pretrain DATA_DIR ...``.

Options are derived from :class:`pretrain.config.PretrainConfig`; user errors print one line and exit 2.
"""
from __future__ import annotations

import logging
import os
import sys

from vitdense.errors import VitdenseError

from .config import build_argparser, config_from_args, explicit_options
from .train import train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_argparser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = train(config_from_args(args, explicit_options(argv)))
    except VitdenseError as err:
        print(f"pretrain: error: {err.cli_message({})}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.steps - result.start_step} steps, last loss {result.last_loss:.4f}; teacher backbone: {result.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
