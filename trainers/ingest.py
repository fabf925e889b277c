"""Streaming ingest: a training table read a block at a time, in a seeded order, never whole.

**Source.** One Parquet file, a folder of Parquet files or a URI prefix (``pyarrow.dataset``, local
or on an object store). Its blocks are the files' row groups, in file order; a row's global index
is its position in the files laid end to end (sorted by path). Only metadata is read up front.

**Order.** Epoch ``e`` is a sequence of all N rows; the epochs are laid end to end and global step
``s`` takes positions ``[s·G, (s+1)·G)`` (G = world × B), rank ``r`` its r-th B-slice — a pure
function of ``(seed, s)`` computed from metadata alone, the same whatever the worker count.

- A table of at most ``shuffle_rows`` rows is one window: epoch ``e`` is a seeded permutation of
  all rows, exactly the order of the in-memory stream of earlier releases.
- A larger table: a seeded permutation of its blocks, cut into windows of consecutive blocks that
  hold at least ``shuffle_rows`` rows; each window's rows (its blocks in file order) are shuffled
  by a seeded permutation of that window. Every row is still seen once per epoch.

**Memory.** A worker holds the blocks of the window its current step reads plus the next window,
read ahead on a background thread — about ``2 × (shuffle_rows + one row group)`` rows of the
columns it needs, whatever N is. Row groups far larger than ``shuffle_rows`` defeat that bound:
``negatron data prepare`` rewrites a table into well-sized row groups.

**Checks.** The driver checks the schema, the metadata and the first block; each worker checks
every block it reads (nulls, empty texts, list lengths) and fails naming the file, the row and
the column.

**Ids** are hashed vectorised (``hash_ids``): 63-bit, stable across processes and machines,
``str(v)`` of an integer id hashing like the string.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from negatron.cluster import storage

from .seeds import block_order_rng, epoch_rng, window_rng

_M63 = np.uint64((1 << 63) - 1)


def splitmix64(h: np.ndarray) -> np.ndarray:
    h = h + np.uint64(0x9E3779B97F4A7C15)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_ids(values: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
    """63-bit ids (int64) of string or integer values, without a Python loop per value.

    Each value's UTF-8 bytes (``str(v)`` for integers) go through two polynomial hashes modulo
    2^64 (different odd multipliers), combined with the length and mixed by splitmix64.
    """
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.large_string())
    arr = pc.cast(arr, pa.large_string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = (np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8))
    lo, hi = int(offsets[0]), int(offsets[-1])
    lengths = np.diff(offsets)
    out = lengths.astype(np.uint64) * np.uint64(0x2545F4914F6CDD1D)
    if hi > lo:
        byte = data[lo:hi].astype(np.uint64) + np.uint64(1)
        owner = np.repeat(np.arange(n), lengths)
        from_end = (offsets[1:][owner] - np.arange(lo, hi) - 1).astype(np.int64)
        longest = int(lengths.max())
        for mult in (0x100000001B3, 0xC2B2AE3D27D4EB4F):
            powers = np.empty(longest, dtype=np.uint64)
            powers[0] = 1
            with np.errstate(over="ignore"):
                for i in range(1, longest):  # a loop over the longest id's length, not the values
                    powers[i] = powers[i - 1] * np.uint64(mult)
                terms = byte * powers[from_end]
                sums = np.zeros(n, dtype=np.uint64)
                nonempty = lengths > 0
                sums[nonempty] = np.add.reduceat(terms, (offsets[:-1][nonempty] - lo))
                out = splitmix64(out ^ sums)
    else:
        out = splitmix64(out)
    return (out & _M63).astype(np.int64)


@dataclass(frozen=True)
class Block:
    file: str         # the file's path or URI (for messages)
    fragment: int     # index into ParquetSource.fragments
    row_group: int
    start: int        # global index of its first row
    rows: int
    file_row: int     # index of its first row within its file


class ParquetSource:
    """The blocks (row groups) of a Parquet file, folder or URI prefix; reads one at a time."""

    def __init__(self, path: str, columns: list[str] | None = None):
        import pyarrow.dataset as pads

        self.path = str(path)
        fs, inner = storage.filesystem(self.path)
        try:
            dataset = pads.dataset(inner, filesystem=fs, format="parquet")
            fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
            blocks: list[Block] = []
            start = 0
            for fi, frag in enumerate(fragments):
                frag.ensure_complete_metadata()
                name = self._display(frag.path, inner)
                file_row = 0
                for rg in frag.row_groups:
                    if rg.num_rows:
                        blocks.append(Block(name, fi, rg.id, start, rg.num_rows, file_row))
                    start += rg.num_rows
                    file_row += rg.num_rows
        except storage.StorageError:
            raise
        except Exception as e:  # ArrowInvalid (not Parquet), OSError (store), ...
            raise storage.error(self.path, e, "cannot read the Parquet data at") from None
        self.schema: pa.Schema = dataset.schema
        self.columns = [c for c in (columns or self.schema.names) if c in self.schema.names]
        self.fragments = fragments
        self.blocks = blocks
        self.num_rows = start
        self.block_starts = np.array([b.start for b in blocks], dtype=np.int64)

    def _display(self, frag_path: str, inner: str) -> str:
        if not storage.is_uri(self.path) or frag_path == inner:
            return storage.redact(self.path) if frag_path == inner else frag_path
        return storage.redact(storage.join(self.path, frag_path[len(inner):].lstrip("/")))

    @property
    def max_block_rows(self) -> int:
        return max((b.rows for b in self.blocks), default=0)

    def read(self, i: int) -> pa.Table:
        b = self.blocks[i]
        frag = self.fragments[b.fragment]
        try:
            return frag.subset(row_group_ids=[b.row_group]).to_table(columns=self.columns)
        except Exception as e:
            raise storage.error(b.file, e, "cannot read a row group of") from None

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_starts, rows, side="right") - 1


class TableSource:
    """An in-memory table as a source (tests, small data): blocks of ``block_rows`` rows."""

    def __init__(self, table: pa.Table, block_rows: int = 1 << 20, name: str = "<table>"):
        self.table, self.path, self.schema, self.columns = table, name, table.schema, table.column_names
        n = table.num_rows
        self.num_rows = n
        self.blocks = [Block(name, 0, i, s, min(block_rows, n - s), s)
                       for i, s in enumerate(range(0, n, block_rows))]
        self.block_starts = np.array([b.start for b in self.blocks], dtype=np.int64)

    @property
    def max_block_rows(self) -> int:
        return max((b.rows for b in self.blocks), default=0)

    def read(self, i: int) -> pa.Table:
        b = self.blocks[i]
        return self.table.slice(b.start, b.rows)

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_starts, rows, side="right") - 1


class WindowOrder:
    """Positions of the endless epoch sequence -> global row indices (see the module docstring)."""

    def __init__(self, block_rows: list[int], seed: int, shuffle_rows: int):
        self.sizes = np.asarray(block_rows, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.n = int(self.sizes.sum())
        self.seed, self.shuffle_rows = seed, max(1, shuffle_rows)
        self.single = self.n <= self.shuffle_rows
        self._plans: OrderedDict[int, tuple] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(blocks of each window, first position of each window) for one epoch."""
        if epoch not in self._plans:
            if self.single:
                windows, wstarts = [np.arange(len(self.sizes))], np.zeros(1, dtype=np.int64)
            else:
                order = block_order_rng(self.seed, epoch).permutation(len(self.sizes))
                windows, current, filled, wstarts, pos = [], [], 0, [], 0
                for b in order:
                    current.append(b)
                    filled += int(self.sizes[b])
                    if filled >= self.shuffle_rows:
                        windows.append(np.sort(np.array(current)))
                        wstarts.append(pos)
                        pos += filled
                        current, filled = [], 0
                if current:
                    windows.append(np.sort(np.array(current)))
                    wstarts.append(pos)
                wstarts = np.array(wstarts, dtype=np.int64)
            self._plans[epoch] = (windows, wstarts)
            while len(self._plans) > 3:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def window_rows(self, epoch: int, w: int) -> np.ndarray:
        """The shuffled rows of window ``w`` of ``epoch`` (its positions in order)."""
        key = (epoch, w)
        if key not in self._windows:
            if self.single:
                rows = epoch_rng(self.seed, epoch).permutation(self.n)
            else:
                blocks = self.plan(epoch)[0][w]
                rows = np.concatenate([np.arange(self.starts[b], self.starts[b] + self.sizes[b]) for b in blocks])
                rows = rows[window_rng(self.seed, epoch, w).permutation(len(rows))]
            self._windows[key] = rows.astype(np.int64)
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def locate(self, pos: int) -> tuple[int, int]:
        """(epoch, window) of a position."""
        epoch, off = divmod(int(pos), self.n)
        return epoch, int(np.searchsorted(self.plan(epoch)[1], off, side="right") - 1)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n)
        for e in np.unique(epochs):
            sel = np.nonzero(epochs == e)[0]
            wstarts = self.plan(int(e))[1]
            ws = np.searchsorted(wstarts, offsets[sel], side="right") - 1
            for w in np.unique(ws):
                part = sel[ws == w]
                out[part] = self.window_rows(int(e), int(w))[offsets[part] - wstarts[w]]
        return out

    def window_blocks(self, epoch: int, w: int) -> np.ndarray:
        windows = self.plan(epoch)[0]
        return windows[w] if w < len(windows) else np.zeros(0, dtype=np.int64)


class BlockCache:
    """Decoded blocks, least recently used out first, with the next window read ahead on one
    background thread. ``check(table, block)`` runs once per block read (the streaming checks)."""

    def __init__(self, source, capacity: int, check=None, prepare=None):
        self.source, self.capacity = source, max(2, capacity)
        self.check, self.prepare = check, prepare
        self._blocks: OrderedDict[int, object] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="negatron-readahead")
        self.reads = 0

    def _load(self, i: int):
        table = self.source.read(i)
        if self.check is not None:
            self.check(table, self.source.blocks[i])
        return self.prepare(table, self.source.blocks[i]) if self.prepare else table

    def get(self, i: int):
        with self._lock:
            if i in self._blocks:
                self._blocks.move_to_end(i)
                return self._blocks[i]
            fut = self._pending.pop(i, None)
        value = fut.result() if fut is not None else self._load(i)
        with self._lock:
            self.reads += fut is None
            self._blocks[i] = value
            self._blocks.move_to_end(i)
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
        return value

    def prefetch(self, blocks) -> None:
        with self._lock:
            todo = [int(b) for b in blocks if int(b) not in self._blocks and int(b) not in self._pending]
            for b in todo:
                self._pending[b] = self._pool.submit(self._counted_load, b)

    def _counted_load(self, i: int):
        value = self._load(i)
        with self._lock:
            self.reads += 1
        return value

    def held_rows(self) -> int:
        with self._lock:
            return sum(self.source.blocks[i].rows for i in self._blocks)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
