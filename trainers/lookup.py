"""Texts by id: hard negatives stored as ids (what ``negatron mine`` writes) are turned back into
texts where the trainer needs them, from a corpus Parquet (``doc_id``, ``text``; read once) or an
index artifact (its ``docs.arrow`` memory-mapped: workers on one node share the page cache).
Ids are hashed like every other id in the trainer (``hash_ids``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from negatron.cluster import storage

from .ingest import hash_ids


class IdIndex:
    """Hashed ids (int64, one per row) -> row, by binary search over the sorted hashes."""

    def __init__(self, hashed: np.ndarray):
        order = np.argsort(hashed, kind="stable")
        self.keys, self.rows = hashed[order], order

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, hashed: np.ndarray) -> np.ndarray:
        """Row of each hashed id (-1 where absent)."""
        at = np.clip(np.searchsorted(self.keys, hashed), 0, max(len(self.keys) - 1, 0))
        hit = self.keys[at] == hashed if len(self.keys) else np.zeros(len(hashed), bool)
        return np.where(hit, self.rows[at], -1)


class TextLookup:
    def __init__(self, path: str):
        from .schema import CORPUS, check_table
        from .vector_index import DOCS_FILE, META_FILE

        self.path = str(path)
        if storage.is_file(storage.join(self.path, META_FILE)):
            folder = storage.local_folder(self.path) if storage.is_remote(self.path) else Path(storage.resolve(self.path))
            docs = pa.ipc.open_file(pa.memory_map(str(folder / DOCS_FILE))).read_all()
        else:
            docs = check_table(self.path, CORPUS)
        self.ids, self.text = IdIndex(hash_ids(docs.column("doc_id"))), docs.column("text")

    def __len__(self) -> int:
        return len(self.ids)

    def texts(self, hashed: np.ndarray) -> list[str]:
        """Texts of hashed ids. Raises KeyError (counting the ids) when any is absent."""
        rows = self.ids.find(np.asarray(hashed, dtype=np.int64))
        if (rows < 0).any():
            raise KeyError(f"{int((rows < 0).sum())} negative id(s) are not in {storage.redact(self.path)}")
        return self.text.take(pa.array(rows)).to_pylist()
