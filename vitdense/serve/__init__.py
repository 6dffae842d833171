"""``vitdense serve``: an image index (an image folder's, or a sharded one of ``vitdense index --embeddings``)
as an HTTP service with a search page.

    app.py       routes (Starlette): parse a request, call one Service method, shape the answer
    service.py   the loaded index (swapped atomically on reload), the query batcher, the page's analyses
    sharded.py   a sharded index served row by row: ids ROW-CHECK, ids read per shard (LRU), tar members
    security.py  ids instead of paths, upload limits, the token and bind rules
    static/      the search page (plain HTML/JS/CSS, served by the app; nothing from a CDN)

Needs the ``serve`` extra (``pip install 'vitdense[serve]'``: starlette and uvicorn).
"""
from __future__ import annotations

from .security import Limits, RequestError
from .service import ServeConfig, Service, Snapshot, open_index

__all__ = ["Limits", "RequestError", "ServeConfig", "Service", "Snapshot", "open_index", "create_app",
           "index_service"]


def index_service(index_dir, device: str = "auto", model: str | None = None, weights: str | None = None,
                  **settings) -> Service:
    """The service ``vitdense serve INDEX`` runs: the index loaded once with its own backbone (``model`` /
    ``weights`` only to name it), ``settings`` the other :class:`ServeConfig` fields. Exported from
    ``vitdense`` as ``index_service``; ``vitdense.create_serve_app(service)`` makes the app."""
    from ..commands.retrieval import index_extractor

    config = ServeConfig(str(index_dir), **settings)
    snapshot = open_index(index_dir, config.collection, id_shards=config.id_shards)
    return Service(config, index_extractor(snapshot.index, index_dir, model, weights, device), snapshot)


def create_app(*args, **kwargs):
    """See :func:`vitdense.serve.app.create_app` (imported on use: starlette is an optional extra)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)
