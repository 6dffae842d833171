"""A small bounded cache: the served index's thumbnails and dense descriptors, and the shard ids a sharded
index reads (:class:`vitdense.collection.index.ShardedIndex`, the served snapshot of one)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class LRU:
    """A small thread-safe least-recently-used cache (in memory only)."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
