"""Tensors read as one flat vector, and one rank's slice of it.

The one slicing that the sharded averaging placement and TWA under
``torch.distributed`` share: the tensors are concatenated in order and padded
to a multiple of the world size; rank r owns ``[r·shard, (r+1)·shard)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyak.distributed_torch import all_gather_flat


class FlatLayout:
    """Where each tensor lies in the flattened tensors, and this rank's slice of them."""

    def __init__(self, shapes: Sequence[torch.Size], rank: int = 0, world: int = 1) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world} is not a valid placement")
        self.shapes = [torch.Size(s) for s in shapes]
        self.rank, self.world = rank, world
        self.sizes = [s.numel() for s in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_elements = sum(self.sizes)
        self.shard = max(1, -(-self.num_elements // world))
        self.begin = rank * self.shard
        self.end = min(self.begin + self.shard, self.num_elements)
        # (tensor index, first element, end element, offset in the shard)
        self.pieces: list[tuple[int, int, int, int]] = []
        for index, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            first, last = max(self.begin, offset), min(self.end, offset + size)
            if first < last:
                self.pieces.append((index, first - offset, last - offset, first - self.begin))

    def slice_into(self, out: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> None:
        """Copies this rank's slice of the flattened ``tensors`` into ``out`` (None: skipped)."""
        for index, first, last, at in self.pieces:
            tensor = tensors[index]
            if tensor is not None:
                out[at : at + last - first].copy_(tensor.detach().reshape(-1)[first:last])

    def local(self, tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """This rank's slice of the flattened tensors, fp32, zero-padded (None reads as 0)."""
        out = torch.zeros(self.shard, dtype=torch.float32, device=device)
        self.slice_into(out, tensors)
        return out

    def segments(self, tensor_indices: Sequence[int]) -> list[tuple[int, int]]:
        """Local column ranges ``[start, end)`` of the given tensors, adjacent ones merged."""
        wanted = set(tensor_indices)
        ranges: list[tuple[int, int]] = []
        for index, first, last, at in self.pieces:
            if index not in wanted:
                continue
            start, end = at, at + last - first
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return ranges

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole flat vector from every rank's slice (``local`` itself with one rank)."""
        if self.world == 1:
            return local
        full = torch.empty(self.shard * self.world, dtype=local.dtype, device=local.device)
        all_gather_flat(full, local.contiguous())
        return full

    def views(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Views of the whole flat vector, shaped like the tensors."""
        return [
            full[offset : offset + shape.numel()].view(shape)
            for offset, shape in zip(self.offsets, self.shapes)
        ]

    @torch.no_grad()
    def scatter_into(self, local: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
        """Writes the whole flattened vector (gathered from every rank's slice) into ``targets``."""
        for target, view in zip(targets, self.views(self.gather(local))):
            target.copy_(view)
