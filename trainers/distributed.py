"""The one module that touches ``torch.distributed``.

Every function falls back to rank 0 / world size 1 when no process group exists, so the same
training code runs in one process, under Ray Train (gloo on CPU, nccl on GPU) and in tests.
Every gather says whether it keeps gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for the local slice.

    forward: x (B×D) -> cat over ranks (N·B×D). backward: all-reduce(SUM) the N·B×D gradient
    (every rank's loss may depend on every slice) and return this rank's B×D slice. Uses
    all-reduce rather than reduce-scatter, which gloo lacks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # N·B×D

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # N·B×D
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]  # B×D


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B×…) from all ranks in rank order, keeping gradients for every slice.

    All ranks must pass the same shape.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order, without gradients (for bank keys, ids)."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks in one flat buffer (a parameter without grad stays None)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def is_timeout(e: BaseException) -> bool:
    """Whether ``e`` is a collective that waited past the process group's timeout (gloo raises a
    RuntimeError "Timed out waiting …ms", NCCL a DistBackendError naming the watchdog timeout)."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def one_line(e: BaseException) -> str:
    """The first line of ``e``'s message, at most 160 characters."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first[:157] + "..." if len(first) > 160 else first


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


GATHER_ROWS_BLOCK = 65536  # rows per rank per gather: bounds the padded buffers


def gather_rows(x, counts: list[int]):
    """Rank 0 gets every rank's rows of a float32 array (rank r holds ``counts[r]`` rows of width
    D), concatenated in rank order; the other ranks get None. Not distributed: ``x`` itself.

    Sent in blocks of at most GATHER_ROWS_BLOCK rows per rank, padded to the largest count, on the
    backend's device (CUDA for NCCL).
    """
    import numpy as np

    if not is_distributed():
        return x
    if len(counts) != world_size() or x.shape[0] != counts[rank()]:
        raise ValueError(f"gather_rows: rank {rank()} holds {x.shape[0]} rows, counts say {counts}")
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    width, first = x.shape[1], rank() == 0
    out = [[] for _ in counts]
    for lo in range(0, max(counts), GATHER_ROWS_BLOCK):
        n = min(GATHER_ROWS_BLOCK, max(counts) - lo)
        buf = torch.zeros(n, width, dtype=torch.float32, device=device)
        mine = x[lo:lo + n]
        if len(mine):
            buf[:len(mine)] = torch.from_numpy(np.ascontiguousarray(mine, dtype=np.float32)).to(device)
        parts = [torch.empty_like(buf) for _ in counts] if first else None
        dist.gather(buf, parts, dst=0)
        if first:
            for r, p in enumerate(parts):
                out[r].append(p[:max(0, min(n, counts[r] - lo))].cpu().numpy())
    if not first:
        return None
    return np.concatenate([a for blocks in out for a in blocks] or [np.zeros((0, width), np.float32)])


class GradReducer:
    """Gradient averaging overlapped with backward (what DDP's reducer does, for a model whose
    loss has its own collectives inside).

    The first step averages in one flat all-reduce after backward (``all_reduce_gradients``) and
    records the order in which parameters' gradients became final; rank 0's order is shared, and
    from then on parameters are cut into buckets of about ``bucket_mb`` in that order. While the
    backward pass is still running, each bucket is all-reduced asynchronously as soon as all of
    its parameters have their gradients, strictly in bucket order so that every rank issues the
    same collectives; ``finish`` waits, copies the averages back and averages whatever was not
    in a bucket. The result is the same as ``all_reduce_gradients``.

    ``arm()`` before the backward pass that makes the gradients final (the last one of a cached
    step), ``finish()`` after it.
    """

    def __init__(self, params: list[torch.nn.Parameter], bucket_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.order: list[int] = []  # params in the order their gradients became final (first step)
        self.buckets: list[list[int]] | None = None
        self.bucket_of: dict[int, int] = {}
        self.armed = False
        self.ready: list[int] = []
        self.launched: list[tuple] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params] if is_distributed() else []

    def arm(self) -> None:
        self.armed = True
        self.order = [] if self.buckets is None else self.order
        if self.buckets is not None:
            self.ready = [len(b) for b in self.buckets]
            self.launched = []

    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        i = self.index[id(p)]
        if self.buckets is None:
            self.order.append(i)
            return
        b = self.bucket_of.get(i)
        if b is None:
            return
        self.ready[b] -= 1
        while len(self.launched) < len(self.buckets) and self.ready[len(self.launched)] <= 0:
            self._launch(len(self.launched))

    def _launch(self, b: int) -> None:
        grads = [self.params[i].grad for i in self.buckets[b] if self.params[i].grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else None
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True) if flat is not None else None
        self.launched.append((b, grads, flat, work))

    def finish(self) -> None:
        """Wait for the buckets, write the averages back; average the rest in one flat buffer."""
        self.armed = False
        if not is_distributed():
            return
        if self.buckets is None:  # the first step: plain, then plan the buckets from the order seen
            all_reduce_gradients(self.params)
            self._plan()
            return
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        world = world_size()
        for _, grads, flat, work in self.launched:
            if work is None:
                continue
            work.wait()
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        in_buckets = set(self.bucket_of)
        all_reduce_gradients([p for i, p in enumerate(self.params) if i not in in_buckets])

    def _plan(self) -> None:
        order = [None]
        if rank() == 0:
            seen = set()
            order = [[i for i in self.order if not (i in seen or seen.add(i))]]
        dist.broadcast_object_list(order, src=0)
        self.order, self.buckets, size = order[0], [], 0
        for i in self.order:
            nbytes = self.params[i].numel() * self.params[i].element_size()
            if not self.buckets or size + nbytes > self.bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            self.bucket_of[i] = len(self.buckets) - 1
            size += nbytes
