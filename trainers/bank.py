"""The shared cross-worker negative memory bank: a FIFO ring of K keys with ids and write steps.

Every worker holds an identical copy: each step the keys of all workers are gathered (no grad) and
enqueued in rank order, so the copies stay equal without a parameter server. K need not divide the
batch: writes wrap around. Entries are masked when empty, older than ``max_age`` steps, or when
their id equals a query's positive id (a duplicate is never a negative). Pure torch, no Ray.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

EMPTY = -1


class MemoryBank(nn.Module):
    """Args:
        size: K slots (> 0).
        dim: key dimension D.
        max_age: entries written more than this many steps ago are ignored (0 = no limit).
    """

    def __init__(self, size: int, dim: int, max_age: int = 0):
        super().__init__()
        if size <= 0:
            raise ValueError(f"bank size must be > 0, got {size}")
        if dim <= 0:
            raise ValueError(f"bank dim must be > 0, got {dim}")
        if max_age < 0:
            raise ValueError(f"bank max_age must be >= 0, got {max_age}")
        self.size, self.dim, self.max_age = size, dim, max_age
        # Buffers, so they move with .to() and land in state_dict (checkpointed on purpose).
        self.register_buffer("keys", torch.zeros(size, dim))                          # K×D
        self.register_buffer("ids", torch.full((size,), EMPTY, dtype=torch.long))     # K
        self.register_buffer("steps", torch.full((size,), EMPTY, dtype=torch.long))   # K, write step
        self.register_buffer("qids", torch.full((size,), EMPTY, dtype=torch.long))    # K, query group
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))                # next slot

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor, step: int, qids: torch.Tensor | None = None) -> None:
        """Write ``keys`` (M×D, already gathered in rank order) with ``ids`` (M) at ``step``;
        ``qids`` (M) are the keys' query-group ids (None: unknown, never matched).

        M may exceed K (only the last K are kept) and need not divide K (writes wrap).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be M×{self.dim}, got {tuple(keys.shape)}")
        if ids.shape != (keys.shape[0],):
            raise ValueError(f"ids must have shape ({keys.shape[0]},), got {tuple(ids.shape)}")
        if qids is None:
            qids = torch.full_like(ids, EMPTY)
        if qids.shape != ids.shape:
            raise ValueError(f"qids must have shape {tuple(ids.shape)}, got {tuple(qids.shape)}")
        # the pointer stays on the device: no host sync per step
        if keys.shape[0] > self.size:  # the first ones would be overwritten in this very call
            skip = keys.shape[0] - self.size
            self.ptr.add_(skip).remainder_(self.size)
            keys, ids, qids = keys[skip:], ids[skip:], qids[skip:]
        m = keys.shape[0]
        slots = (self.ptr + torch.arange(m, device=self.keys.device)) % self.size  # M, wraps
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = ids.to(self.ids.device)
        self.qids[slots] = qids.to(self.qids.device)
        self.steps[slots] = step
        self.ptr.add_(m).remainder_(self.size)

    def valid(self, step: int) -> torch.Tensor:
        """K bools: slot filled and (no max age or written within ``max_age`` steps of ``step``)."""
        ok = self.steps >= 0  # K
        if self.max_age:
            ok &= (step - self.steps) <= self.max_age  # K
        return ok

    def fill(self) -> int:
        return int((self.steps >= 0).sum())

    def mean_age(self, step: int) -> float:
        """Mean steps since the filled entries were written (0 when empty); a host sync: call it
        when logging."""
        filled = self.steps >= 0
        n = int(filled.sum())
        return float((step - self.steps[filled]).float().mean()) if n else 0.0

    def checksum(self) -> str:
        """A digest of the whole state: equal on every worker after every step."""
        h = hashlib.sha256()
        for t in (self.keys, self.ids, self.steps, self.ptr, self.qids):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before query groups were tracked have no qids: unknown, never matched
        state_dict.setdefault(prefix + "qids", torch.full((self.size,), EMPTY, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, max_age={self.max_age}"
