"""Collections past one machine: sharded, resumable embedding and a faiss index built from the shards.

    sources.py   folders, .txt/.parquet lists, webdataset tars → shard plans and rows (id, bytes)
    embed.py     the one per-batch function and the per-shard loop every engine runs
    shards.py    Parquet shards + done-markers + manifest.json (resume by construction)
    engines.py   where shards run: local (this process) or ray (Ray Data actor pool); embed_collection
    index.py     index build from the shards under a memory budget (train, add per shard, merge on disk),
                 and ShardedIndex: memory-mapped search with exact re-ranking from the shards' vectors
"""
from __future__ import annotations

# Public names (re-exported by vitdense/__init__.py): embed_collection, ExtractorSpec, build_index,
# ShardedIndex, open_index, choose_index, read_patches.
