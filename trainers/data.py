"""A sharded, stateless pair stream over a Parquet source (or an in-memory table), read a block
at a time (``trainers/ingest.py``).

The epochs are laid end to end: epoch e is a seeded order of all rows (a permutation of all rows
for a table of at most ``data.shuffle_rows`` rows; a windowed block shuffle beyond that); global
step s takes positions [s·G, (s+1)·G) of that endless sequence (G = world·B), and rank r takes its
r-th B-slice. So every pair is seen exactly once per epoch across all workers, the global batch is
the same whatever the worker count (1×2B and 2×B see the same rows), and a resumed run continues
at the saved position: step s is a pure function of (seed, s).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .image_encoder import decode_images, to_tensor
from .ingest import BlockCache, TableSource, WindowOrder, splitmix64, hash_ids
from .seeds import block_order_rng, epoch_rng

DEFAULT_SHUFFLE_ROWS = 65536


def stable_id(value) -> int:
    """A 63-bit integer id for any string/int id (stable across processes and machines)."""
    return int(hash_ids(pa.array([str(value)]))[0])


def text_ids(text_hashes: np.ndarray) -> np.ndarray:
    """Ids for texts that have no id (a hard negative without ``negative_ids``): apart from the
    ids of ``hash_ids``."""
    return (splitmix64(text_hashes.astype(np.uint64) ^ np.uint64(0x7465787469640000))
            & np.uint64((1 << 63) - 1)).astype(np.int64)


_PREFILL_STREAM = 0x6E65676174  # an rng stream no epoch number reaches


class RowSchedule:
    """Which rows global step s takes, and this rank's share (see the module docstring)."""

    def __init__(self, n: int | list[int], batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle_rows: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        sizes = [n] if isinstance(n, int) else list(n)
        self.order = WindowOrder(sizes, seed, shuffle_rows or DEFAULT_SHUFFLE_ROWS)
        self.n = self.order.n
        self.b, self.rank, self.world, self.seed = batch_size, rank, world, seed

    @property
    def global_batch(self) -> int:
        return self.b * self.world

    def global_rows(self, step: int) -> np.ndarray:
        """Row indices of the whole global batch of ``step`` (G)."""
        start = step * self.global_batch
        return self.order.rows(np.arange(start, start + self.global_batch, dtype=np.int64))

    def local_rows(self, step: int) -> np.ndarray:
        """This rank's B-slice of global batch ``step``."""
        start = step * self.global_batch + self.rank * self.b
        return self.order.rows(np.arange(start, start + self.b, dtype=np.int64))

    def prefill_rows(self, count: int) -> np.ndarray:
        """This rank's share of up to ``count`` distinct rows for filling the bank before step 0.

        A seeded sample apart from the epoch order (from a few seeded blocks of a large table);
        every rank gets the same number (the total is rounded down to a multiple of the world
        size), and rank order gives the sample's order.
        """
        per = min(count, self.n) // self.world
        if self.order.single:
            rows = epoch_rng(self.seed, _PREFILL_STREAM).permutation(self.n)[: per * self.world]
        else:
            o = self.order
            picked, total = [], 0
            for b in block_order_rng(self.seed, _PREFILL_STREAM).permutation(len(o.sizes)):
                picked.append(np.arange(o.starts[b], o.starts[b] + o.sizes[b]))
                total += int(o.sizes[b])
                if total >= per * self.world:
                    break
            pool = np.concatenate(picked)
            rows = pool[epoch_rng(self.seed, _PREFILL_STREAM).permutation(len(pool))][: per * self.world]
        return rows[self.rank * per:(self.rank + 1) * per]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


class PairStream(RowSchedule):
    """Args:
        source: a ``ParquetSource`` (streamed) or a ``pa.Table`` of pairs (query, positive,
            query_id, positive_id [, negatives, negative_ids]).
        batch_size: B per worker.
        rank, world: this worker and the worker count.
        seed: order seed.
        num_negatives: H hard negatives per row (0 = ignore the negatives column).
        shuffle_rows: rows per shuffle window (a table up to this size is fully permuted).
        check: ``check(table, block)`` on every block read (the streaming per-row checks).
        lookup: a ``TextLookup`` for a table whose hard negatives are ids only (``negative_ids``,
            no ``negatives`` texts): their texts are looked up there.
    """

    def __init__(self, source, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 num_negatives: int = 0, shuffle_rows: int | None = None, check=None, lookup=None):
        if isinstance(source, pa.Table):
            source = TableSource(source)
        self.source = source
        super().__init__([b.rows for b in source.blocks], batch_size, rank, world, seed, shuffle_rows)
        names = source.schema.names
        self.lookup = lookup if "negatives" not in names and "negative_ids" in names else None
        self.h = num_negatives if "negatives" in names or self.lookup is not None else 0
        self.has_neg_ids = self.h > 0 and "negative_ids" in names
        wanted = ["query", "positive", "query_id", "positive_id"]
        if self.h:
            wanted += (["negatives"] if self.lookup is None else []) + (["negative_ids"] if self.has_neg_ids else [])
        source.columns = wanted
        # every block of the current window and of the next one (read ahead) fits
        sizes = np.sort(self.order.sizes)
        per_window = int(np.searchsorted(np.cumsum(sizes), self.order.shuffle_rows) + 1)
        self.cache = BlockCache(source, 2 * min(per_window, len(sizes)) + 2, check=check, prepare=self._prepare)
        self._window_seen: tuple[int, int] | None = None
        self._text_maps: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _prepare(self, table: pa.Table, block) -> dict:
        """One block as Arrow texts and hashed ids (done once per block read)."""
        out = {"query": table.column("query").combine_chunks(),
               "positive": table.column("positive").combine_chunks(),
               "pos_ids": hash_ids(table.column("positive_id")),
               "query_ids": hash_ids(table.column("query_id"))}
        if self.h and self.lookup is not None:
            ids = table.column("negative_ids").combine_chunks()
            out["neg_id_values"] = hash_ids(pc.list_flatten(ids))
            out["neg_id_offsets"] = out["neg_offsets"] = _list_offsets(ids)
        elif self.h:
            negs = table.column("negatives").combine_chunks()
            out["negatives"] = negs
            if self.has_neg_ids:
                ids = table.column("negative_ids").combine_chunks()
                out["neg_id_values"] = hash_ids(pc.list_flatten(ids))
                out["neg_id_offsets"] = _list_offsets(ids)
            else:
                out["pos_text_hash"] = hash_ids(out["positive"])
                out["neg_text_hash"] = hash_ids(pc.list_flatten(negs))
            out["neg_offsets"] = _list_offsets(negs)
        return out

    def _gather(self, rows: np.ndarray) -> list[tuple[np.ndarray, dict, np.ndarray]]:
        """(positions in ``rows``, prepared block, rows within the block) for each block used."""
        blocks = self.source.block_of(rows)
        out = []
        for b in np.unique(blocks):
            where = np.nonzero(blocks == b)[0]
            out.append((where, self.cache.get(int(b)), rows[where] - self.source.blocks[int(b)].start))
        return out

    def _texts(self, parts, key: str, n: int) -> list[str]:
        out: list = [None] * n
        for where, blk, local in parts:
            for i, t in zip(where, blk[key].take(pa.array(local)).to_pylist()):
                out[i] = t
        return out

    def _ids(self, parts, key: str, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for where, blk, local in parts:
            out[where] = blk[key][local]
        return out

    def _read_ahead(self, step: int) -> None:
        """Entering a new window: read the next window's blocks in the background."""
        e, w = self.order.locate(step * self.global_batch + self.rank * self.b)
        if (e, w) == self._window_seen:
            return
        self._window_seen = (e, w)
        nxt = (e, w + 1) if w + 1 < len(self.order.plan(e)[0]) else (e + 1, 0)
        self.cache.prefetch(self.order.window_blocks(*nxt))

    def _text_map(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positive-text hashes of a window and the matching positive ids (the last row
        with a text wins, as a dict over the rows in order would)."""
        key = (epoch, w)
        if key not in self._text_maps:
            blocks = self.order.window_blocks(epoch, w)
            hashes = np.concatenate([self.cache.get(int(b))["pos_text_hash"] for b in blocks])
            ids = np.concatenate([self.cache.get(int(b))["pos_ids"] for b in blocks])
            order = np.argsort(hashes, kind="stable")
            self._text_maps[key] = (hashes[order], ids[order])
            while len(self._text_maps) > 2:
                self._text_maps.popitem(last=False)
        return self._text_maps[key]

    def prefill(self, count: int) -> tuple[list[str], torch.Tensor]:
        """This rank's positives (texts, ids) for filling the bank: see ``prefill_rows``."""
        rows = self.prefill_rows(count)
        parts = self._gather(rows)
        return self._texts(parts, "positive", len(rows)), torch.from_numpy(self._ids(parts, "pos_ids", len(rows)))

    def batch(self, step: int) -> dict:
        """This rank's slice of global batch ``step``: texts, ids (tensor B) and hard negatives."""
        self._read_ahead(step)
        rows = self.local_rows(step)
        parts = self._gather(rows)
        n = len(rows)
        out = {
            "rows": rows,
            "query": self._texts(parts, "query", n),
            "positive": self._texts(parts, "positive", n),
            "pos_ids": torch.from_numpy(self._ids(parts, "pos_ids", n)),
            "query_ids": torch.from_numpy(self._ids(parts, "query_ids", n)),
        }
        if self.h:
            out.update(self._negatives(step, parts, n))
        return out

    def _negatives(self, step: int, parts, n: int) -> dict:
        h = self.h
        texts = [""] * (n * h)
        ids = np.full(n * h, -1, dtype=np.int64)
        valid = np.zeros(n * h, dtype=bool)
        if not self.has_neg_ids:
            positions = step * self.global_batch + self.rank * self.b + np.arange(n)
        for where, blk, local in parts:
            off = blk["neg_offsets"]
            if self.lookup is not None:  # ids only: their texts come from the lookup, below
                for i, row in zip(where, local):
                    got = blk["neg_id_values"][off[row]:off[row + 1]][:h]
                    ids[i * h:i * h + len(got)] = got
                    valid[i * h:i * h + len(got)] = True
                continue
            lists = blk["negatives"].take(pa.array(local)).to_pylist()
            for j, (i, row) in enumerate(zip(where, local)):
                negs = (lists[j] or [])[:h]
                k = len(negs)
                lo = off[row]
                texts[i * h:i * h + k] = negs
                valid[i * h:i * h + k] = True
                if self.has_neg_ids:
                    ido = blk["neg_id_offsets"]
                    got = blk["neg_id_values"][ido[row]:ido[row] + k]
                    ids[i * h:i * h + len(got)] = got
                else:
                    th = blk["neg_text_hash"][lo:lo + k]
                    e, w = self.order.locate(int(positions[i]))
                    keys, pos_ids = self._text_map(e, w)
                    at = np.clip(np.searchsorted(keys, th, side="right") - 1, 0, max(len(keys) - 1, 0))
                    hit = keys[at] == th if len(keys) else np.zeros(k, bool)
                    ids[i * h:i * h + k] = np.where(hit, pos_ids[at] if len(keys) else 0, text_ids(th))
        if self.lookup is not None and valid.any():
            try:
                found = self.lookup.texts(ids[valid])
            except KeyError as e:
                raise ValueError(f"data.train, global step {step}: {e.args[0]} (data.negatives_corpus must be "
                                 "the corpus the negatives were mined from)") from None
            for i, text in zip(np.flatnonzero(valid), found):
                texts[i] = text
        return {"negatives": texts,  # B·H (padded with "" where a row has fewer)
                "neg_ids": torch.from_numpy(ids), "neg_valid": torch.from_numpy(valid)}

    def close(self) -> None:
        self.cache.close()


def _list_offsets(arr: pa.Array) -> np.ndarray:
    """Start of each row's values in the flattened list (a null list counts as empty)."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.concatenate([[0], np.cumsum(lengths)])


class ImageStream(RowSchedule):
    """Global step s → this rank's B images (uint8 → float) and their ids, in the same row
    order as the text pair stream: one seeded permutation per epoch, laid end to end."""

    def __init__(self, table: pa.Table, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        super().__init__(table.num_rows, batch_size, rank, world, seed, shuffle_rows=max(1, table.num_rows))
        self.images = decode_images(table.column("image").to_pylist())  # N×H×W[×C] uint8
        self.ids = hash_ids(table.column("id"))

    def batch(self, step: int) -> dict:
        rows = self.local_rows(step)
        x = to_tensor(self.images[rows])
        return {"rows": rows, "query": x, "positive": x, "pos_ids": torch.from_numpy(self.ids[rows])}
