"""A sharded, stateless pair stream over a pyarrow table.

The epochs are laid end to end: epoch e is a seeded permutation of all rows; global step s takes
rows [s·G, (s+1)·G) of that endless sequence (G = world·B), and rank r takes its r-th B-slice.
So every pair is seen exactly once per epoch across all workers, the global batch is the same
whatever the worker count (1×2B and 2×B see the same rows), and a resumed run continues at the
saved position: step s is a pure function of (seed, s).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

from .image_encoder import decode_images, to_tensor
from .seeds import epoch_rng


def stable_id(value) -> int:
    """A 63-bit integer id for any string/int id (stable across processes and machines)."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


_PREFILL_STREAM = 0x6E65676174  # an rng stream no epoch number reaches


class RowSchedule:
    """Which rows global step s takes, and this rank's share (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.n = n
        self.b, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.b * self.world

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            self._perm_cache[epoch] = epoch_rng(self.seed, epoch).permutation(self.n)
        return self._perm_cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Row indices of the whole global batch of ``step`` (G)."""
        start = step * self.global_batch
        pos = np.arange(start, start + self.global_batch)
        epochs, offsets = pos // self.n, pos % self.n
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def local_rows(self, step: int) -> np.ndarray:
        """This rank's B-slice of global batch ``step``."""
        return self.global_rows(step)[self.rank * self.b:(self.rank + 1) * self.b]

    def prefill_rows(self, count: int) -> np.ndarray:
        """This rank's share of up to ``count`` distinct rows for filling the bank before step 0.

        A seeded sample apart from the epoch order; every rank gets the same number (the total is
        rounded down to a multiple of the world size), and rank order gives the sample's order.
        """
        per = min(count, self.n) // self.world
        rows = epoch_rng(self.seed, _PREFILL_STREAM).permutation(self.n)[: per * self.world]
        return rows[self.rank * per:(self.rank + 1) * per]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


class PairStream(RowSchedule):
    """Args:
        table: pairs (query, positive, query_id, positive_id [, negatives, negative_ids]).
        batch_size: B per worker.
        rank, world: this worker and the worker count.
        seed: permutation seed.
        num_negatives: H hard negatives per row (0 = ignore the negatives column).
    """

    def __init__(self, table: pa.Table, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 num_negatives: int = 0):
        super().__init__(table.num_rows, batch_size, rank, world, seed)
        self.queries = table.column("query").to_pylist()
        self.positives = table.column("positive").to_pylist()
        pos_id_values = table.column("positive_id").to_pylist()
        self.pos_ids = np.array([stable_id(v) for v in pos_id_values], dtype=np.int64)
        # rows of one query (several positives) share a group id: none is another's negative
        self.query_ids = np.array([stable_id(v) for v in table.column("query_id").to_pylist()], dtype=np.int64)
        self.h = num_negatives if "negatives" in table.column_names else 0
        if self.h:
            self.negatives = [list(v or []) for v in table.column("negatives").to_pylist()]
            if "negative_ids" in table.column_names:
                self.neg_ids = [[stable_id(x) for x in (v or [])] for v in table.column("negative_ids").to_pylist()]
            else:
                # No ids: a negative whose text is some row's positive takes that positive's id (so
                # it is masked where that positive is the answer); any other text gets a text id.
                by_text = {t: int(i) for t, i in zip(self.positives, self.pos_ids)}
                self.neg_ids = [[by_text.get(t, stable_id("text:" + t)) for t in v] for v in self.negatives]

    def prefill(self, count: int) -> tuple[list[str], torch.Tensor]:
        """This rank's positives (texts, ids) for filling the bank: see ``prefill_rows``."""
        rows = self.prefill_rows(count)
        return [self.positives[i] for i in rows], torch.from_numpy(self.pos_ids[rows])

    def batch(self, step: int) -> dict:
        """This rank's slice of global batch ``step``: texts, ids (tensor B) and hard negatives."""
        rows = self.local_rows(step)
        out = {
            "rows": rows,
            "query": [self.queries[i] for i in rows],
            "positive": [self.positives[i] for i in rows],
            "pos_ids": torch.from_numpy(self.pos_ids[rows]),
            "query_ids": torch.from_numpy(self.query_ids[rows]),
        }
        if self.h:
            texts, ids, valid = [], [], []
            for i in rows:
                negs, nids = self.negatives[i][: self.h], self.neg_ids[i][: self.h]
                pad = self.h - len(negs)
                texts += negs + [""] * pad
                ids += nids + [-1] * pad
                valid += [True] * len(negs) + [False] * pad
            out["negatives"] = texts  # B·H (padded with "" where a row has fewer)
            out["neg_ids"] = torch.tensor(ids, dtype=torch.long)
            out["neg_valid"] = torch.tensor(valid, dtype=torch.bool)
        return out


class ImageStream(RowSchedule):
    """Global step s → this rank's B images (uint8 → float) and their ids, in the same row
    order as the text pair stream: one seeded permutation per epoch, laid end to end."""

    def __init__(self, table: pa.Table, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        super().__init__(table.num_rows, batch_size, rank, world, seed)
        self.images = decode_images(table.column("image").to_pylist())  # N×H×W[×C] uint8
        self.ids = np.array([stable_id(v) for v in table.column("id").to_pylist()], dtype=np.int64)

    def batch(self, step: int) -> dict:
        rows = self.local_rows(step)
        x = to_tensor(self.images[rows])
        return {"rows": rows, "query": x, "positive": x, "pos_ids": torch.from_numpy(self.ids[rows])}
