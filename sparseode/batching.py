"""Batches for ``fit``/``evaluate``: tensors, ``(X, y)`` tuples or re-iterables, sharded over ranks.

Data is a Tensor ``(n, ...)`` (unsupervised: flows), a tuple ``(X, y)`` of tensors with the same
first dimension, or a re-iterable of batches (a list, a ``DataLoader``; each batch a tensor or a
tuple/list of tensors). Batches are always handed out as tuples.

Under a process group (:mod:`sparseode.distributed`) a batch is a *global* batch: each rank gets
its contiguous share of it (:func:`sparseode.distributed.shard`), so N ranks with batch size B
take the same optimiser steps as one process with batch size B. A ``DataLoader`` whose sampler is
a ``DistributedSampler`` already yields this rank's batches and is used as it is.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, Union

import torch
from torch import Tensor

from sparseode import distributed

Batch = tuple[Tensor, ...]
Data = Union[Tensor, tuple, list, Iterable]


def check_finite(t: Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def as_tuple(batch: Any, name: str) -> Batch:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(torch.is_tensor(b) for b in batch):
        return tuple(batch)
    raise TypeError(f"{name} must yield tensors or tuples of tensors, got {type(batch).__name__}")


def to_device(batch: Batch, device: torch.device | None) -> Batch:
    return batch if device is None else tuple(t.to(device) for t in batch)


def _distributed_sampler(data: Any) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(getattr(data, "sampler", None), DistributedSampler)


class Batches:
    """Re-iterable batches over a Tensor, a tuple of tensors, or an iterable of batches."""

    def __init__(self, data: Data, batch_size: int, name: str) -> None:
        self.name = name
        self.batch_size = batch_size
        self.tensors: Batch | None = None
        self.iterable: Iterable | None = None
        if torch.is_tensor(data) or (isinstance(data, tuple) and data and all(torch.is_tensor(d) for d in data)):
            tensors = as_tuple(data, name)
            n = tensors[0].shape[0] if tensors[0].dim() else 0
            if n == 0:
                raise ValueError(f"{name} is empty")
            for t in tensors:
                if t.dim() == 0 or t.shape[0] != n:
                    raise ValueError(f"{name}: all tensors need the same first dimension, got "
                                     f"{[tuple(x.shape) for x in tensors]}")
                check_finite(t, name)
            self.tensors = tensors
        elif isinstance(data, Iterable):
            if iter(data) is data:
                raise TypeError(f"{name} is a one-shot iterator; pass a re-iterable (list, DataLoader)")
            self.iterable = data
        else:
            raise TypeError(f"{name} must be a Tensor, a tuple (X, y) of tensors or an iterable of batches, "
                            f"got {type(data).__name__}")
        self.presharded = self.iterable is not None and _distributed_sampler(self.iterable)

    def __len__(self) -> int:
        if self.tensors is not None:
            return math.ceil(self.tensors[0].shape[0] / self.batch_size)
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def describe(self) -> tuple[str, int, str]:
        """What ranks must agree on: the kind of data, its number of batches and, for tensors, a
        hash of their values (every rank must hold the whole data set: it is sharded per batch)."""
        if self.tensors is None:
            return type(self.iterable).__name__, len(self), ""
        h = hashlib.sha256()
        for t in self.tensors:
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(distributed.tensor_bytes(t))
        return "tensors", len(self), h.hexdigest()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a ``DistributedSampler`` for ``epoch``."""
        if self.presharded:
            self.iterable.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def _global(self, generator: torch.Generator | None) -> Iterator[Batch]:
        if self.tensors is not None:
            n = self.tensors[0].shape[0]
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                yield tuple(t[idx.to(t.device)] for t in self.tensors)
        else:
            for batch in self.iterable:  # type: ignore[union-attr]
                b = as_tuple(batch, self.name)
                for t in b:
                    check_finite(t, self.name)
                yield b

    def iterate(self, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """The batches of one pass (tensor data shuffled by ``generator`` when given)."""
        return self._global(generator)

    def iterate_shards(self, generator: torch.Generator | None = None,
                       min_rows: int = 1) -> Iterator[tuple[Batch, int]]:
        """``(this rank's share of a global batch, rows of the global batch)`` for one pass.

        Global batches with fewer than ``min_rows`` rows are skipped on every rank (training
        passes ``min_rows = world size`` so that every rank has rows to backpropagate).
        In one process this is ``(batch, len(batch))``.
        """
        w = distributed.world_size()
        for batch in self._global(generator):
            n = batch[0].shape[0]
            if self.presharded or w == 1:
                yield batch, n * (w if self.presharded else 1)
                continue
            if n < min_rows:
                continue
            start, stop = distributed.shard(n)
            if stop > start:
                yield tuple(t[start:stop] for t in batch), n
