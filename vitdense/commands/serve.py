"""``vitdense serve INDEX``: the index as an HTTP service with a search page (see :mod:`vitdense.serve`)."""
from __future__ import annotations

import click

from ..cli import main
from ..errors import ConfigError


@main.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but this machine needs --token or --open.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--token", envvar="VITDENSE_TOKEN", default=None,
              help="Secret every client must send ('Authorization: Bearer TOKEN'; the page: open /?token=TOKEN). "
                   "Also read from $VITDENSE_TOKEN.")
@click.option("--open", "open_access", is_flag=True,
              help="Serve anyone who can reach --host without a token (says so at start).")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Collection folder whose images may be served (default: the folder the index was built from; "
                   "for a sharded index the common folder of its embedded files and tars).")
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True, help="Largest upload (413 above).")
@click.option("--max-pixels", type=int, default=40_000_000, show_default=True,
              help="Largest upload in width x height (413 above; refuses decompression bombs).")
@click.option("--batch-window-ms", type=float, default=5.0, show_default=True,
              help="How long a query may wait for others that have arrived and are still being decoded, to share "
                   "its forward pass (never when there are none; 0: only those already queued).")
@click.option("--max-batch", type=int, default=32, show_default=True, help="Queries per forward pass (1: no batching).")
@click.option("--poll", "poll_s", type=float, default=2.0, show_default=True,
              help="Seconds between checks for a new index generation (0: reload on SIGHUP only).")
@click.option("-k", "k", type=int, default=12, show_default=True, help="Results per query unless the request says.")
@click.option("--model", default=None, help="Backbone (default: the one the index was built with).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Weights file (default: the one the index was built with).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def serve(index_dir: str, host: str, port: int, token: str | None, open_access: bool, root: str | None,
          max_upload_mb: float, max_pixels: int, batch_window_ms: float, max_batch: int, poll_s: float, k: int,
          model: str | None, weights: str | None, device: str) -> None:
    """Serve the index INDEX_DIR (of an image folder, or sharded: `vitdense index --embeddings`) over HTTP: a search page at /, and a JSON API (/search, /image/ID,
    /thumb/ID, /correspond, /heatmap, /stats, /health). Reloads the index on SIGHUP and when `vitdense
    index` writes a new generation. Needs `pip install 'vitdense[serve]'`.
    """
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as err:
        raise ConfigError(f"vitdense serve needs the serve extra ({err.name} is missing): "
                          f"pip install 'vitdense[serve]'") from None
    from ..serve.security import LOOPBACK, Limits, check_bind
    from ..serve.service import ServeConfig, Service, open_index
    from .retrieval import index_extractor

    check_bind(host, token, open_access)
    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-pixels", max_pixels),
                        ("--max-batch", max_batch), ("-k", k)):
        if value <= 0:
            raise ConfigError(f"{name} {value}: must be positive")
    if batch_window_ms < 0 or poll_s < 0:
        raise ConfigError("--batch-window-ms and --poll must be 0 or more")
    if not 1 <= k <= 100:
        raise ConfigError(f"-k {k}: must be in 1..100")
    config = ServeConfig(index_dir, root, batch_window_ms / 1000, max_batch, poll_s, k)
    snapshot = open_index(index_dir, root)
    extractor = index_extractor(snapshot.index, index_dir, model, weights, device)
    service = Service(config, extractor, snapshot)
    limits = Limits(int(max_upload_mb * 2**20), max_pixels)
    local = host in LOOPBACK
    app = create_app(service, limits, token, allowed_hosts=LOOPBACK if local else None)
    access = ("token required" if token else
              "OPEN: anyone who can reach it may search and read the indexed images" if not local else
              "this machine only")
    click.echo(f"serving {index_dir}: {len(snapshot)} image(s), {extractor.model_type} on {extractor.device}, "
               f"generation {snapshot.generation}; http://{host}:{port}/ ({access})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                server_header=False, date_header=False)
