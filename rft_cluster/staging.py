"""Shared-memory staging for weights on their way into an engine: buckets packed back to back in
a memfd that a process on the same node maps. The CPU weight-transfer backend (`shm_transfer.py`)
is built on it; it needs only torch (no vLLM), so the learner's packing can be checked where vLLM
is not installed (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


class Staging:
    """An anonymous memfd another process on the node maps through /proc/PID/fd/FD. It grows to
    the largest bucket and is reused (its pages are faulted in once, not per bucket); it is
    freed when every process has closed it, so a killed actor leaks nothing."""

    def __init__(self) -> None:
        self._fd = -1
        self._map: mmap.mmap | None = None

    def reserve(self, nbytes: int) -> torch.Tensor:
        """A writable uint8 view of the first `nbytes`; valid until the next `reserve`."""
        if self._map is None or len(self._map) < nbytes:
            # A new file: readers tell it from the old one by its inode (`Mappings`), since its
            # fd number, and so its path, may be one another area of this process had before.
            fd = os.memfd_create("rft-weight-staging")
            os.ftruncate(fd, max(nbytes, 1))
            old_fd, self._fd, self._map = self._fd, fd, mmap.mmap(fd, max(nbytes, 1))
            if old_fd >= 0:
                os.close(old_fd)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    def write(self, data: np.ndarray) -> str:
        """Copies `data` in; returns the path to map."""
        self.reserve(data.nbytes).numpy()[:] = data
        return self.path


class Mappings:
    """A reader's read-only mappings of staging files, kept while the writer keeps the same file.
    Keyed by path and inode: a writer's fd number (the path) can come back for another file."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}

    def view(self, path: str, nbytes: int) -> memoryview:
        fd = os.open(path, os.O_RDONLY)
        try:
            inode = os.fstat(fd).st_ino
            kept = self._maps.get(path)
            if kept is None or kept[0] != inode or len(kept[1]) < nbytes:
                kept = self._maps[path] = (inode, mmap.mmap(fd, 0, prot=mmap.PROT_READ))
        finally:
            os.close(fd)
        return memoryview(kept[1])[:nbytes]

    def close(self) -> None:
        self._maps.clear()


def typed_view(buffer: Any, dtype: str) -> torch.Tensor:
    """A flat tensor of `dtype` over `buffer`'s memory, even a read-only one (the object store's,
    a read-only mapping): torch warns that it cannot mark a tensor read-only, and every
    consumer here copies out of it (`load_weights`), so the warning is moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(buffer, dtype=getattr(torch, dtype)) if len(buffer) else torch.empty(0, dtype=getattr(torch, dtype))


def unflatten(names: list[str], shapes: list[list[int]], dtypes: list[str], buffer: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) pairs over a packed bucket, without copying it."""
    offset = 0
    for name, shape, dtype in zip(names, shapes, dtypes):
        n = math.prod(shape) * getattr(torch, dtype).itemsize
        yield name, typed_view(buffer[offset : offset + n], dtype).view(shape)
        offset += n


# ---------------------------------------------------------------- packing


@dataclass
class Bucket:
    """Several tensors packed back to back in one staging area (one transfer, not one per tensor)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    path: str
    nbytes: int

    def update_info(self) -> dict[str, Any]:
        return asdict(self)


def _copy_into(dst: torch.Tensor, t: torch.Tensor) -> None:
    """Copies `t`'s bytes into the uint8 tensor `dst`. A CPU tensor goes through numpy, a plain
    memcpy: torch's copy_ splits the work over its threads, which on a busy CPU made packing
    3-6x slower. Anything else (a GPU tensor: the device-to-host copy) goes through torch."""
    if t.device.type == "cpu" and t.is_contiguous():
        dst.numpy()[:] = t.reshape(-1).view(torch.uint8).numpy()
    else:
        dst.view(t.dtype).view(t.shape).copy_(t)


def pack(named_tensors: Iterable[tuple[str, torch.Tensor]], areas: list[Staging], bucket_bytes: int) -> Iterator[Bucket]:
    """Copies tensors (any device; each need only stay valid until the next is requested, e.g. a
    ZeRO-3 gather) straight into buckets of at most `bucket_bytes` (one tensor may exceed it
    alone), using the staging areas in turn: a bucket stays valid until `len(areas)` more are
    requested."""
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    dst, used, turn = torch.empty(0, dtype=torch.uint8), 0, 0

    def bucket() -> Bucket:
        return Bucket(list(names), list(dtypes), list(shapes), areas[(turn - 1) % len(areas)].path, used)

    for name, t in named_tensors:
        nb = t.numel() * t.element_size()
        if names and used + nb > dst.numel():
            yield bucket()
            names.clear(), dtypes.clear(), shapes.clear()
        if not names:
            dst, used = areas[turn % len(areas)].reserve(max(bucket_bytes, nb)), 0
            turn += 1
        _copy_into(dst[used : used + nb], t.detach())
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(list(t.shape))
        used += nb
    if names:
        yield bucket()
