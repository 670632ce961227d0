"""Block planning for Shampoo, shared by the torch and jax twins.

Pure Python, no framework: everything here depends only on parameter shapes
and a :class:`~polyak.optim.shampoo_config.ShampooConfig`, so both twins cut
the same blocks and, under data parallelism, hand the same blocks to the same
ranks.

How a parameter of shape ``shape`` is planned:

1. **Grafted only?** A parameter with any dimension ``>= preconditioning_dim_limit``
   (Criteo's embedding table) gets no factors at all. So does a parameter with
   fewer than two elements (0-d scalars and all-ones shapes): for a single
   element, the Shampoo direction ``g / sqrt(g² + ε)`` rescaled to the grafted
   norm *is* the grafted direction, so factors would only cost memory. Empty
   parameters (a dimension of size 0) are grafted only too.
2. **Merge.** Size-1 dimensions are squeezed out, then adjacent dimensions are
   merged left to right while their product stays ``<= max_preconditioner_dim``
   (a ``3×3×64×64`` conv kernel becomes ``(576, 64)`` with 1024).
3. **Split.** Each merged dimension is cut into chunks of at most
   ``max_preconditioner_dim``; the blocks are the Cartesian product of the
   chunks, in row-major order. A block of order ``k`` has ``k`` factors whose
   sizes are the block's dimensions.

The parameter is viewed as ``reshape(merged_shape)``; block slices index that view.

Distribution: :func:`assign_blocks` spreads blocks over ranks greedily by
:func:`block_cost` (the ``O(d³)`` eigendecomposition work), largest first, each
to the least-loaded rank (ties: the lower rank). Ties between blocks of equal
cost are broken by their position, so the plan is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

from polyak.optim.shampoo_config import ShampooConfig

__all__ = [
    "Block",
    "BlockRef",
    "ParameterPlan",
    "assign_blocks",
    "block_cost",
    "grafting_blocks",
    "merge_dims",
    "plan_parameter",
    "plan_parameters",
    "rank_loads",
    "split_dim",
]


class ShampooBlockingError(ValueError):
    """A shape or a world size that blocking cannot work with."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One preconditioned block of a parameter.

    ``slices`` index the parameter viewed in its merged shape; ``dims`` are the
    block's shape, which is also the sizes of its Kronecker factors (one
    ``d×d`` factor per entry). ``offset`` is where the block starts in a flat
    buffer holding the parameter's blocks one after another (each block
    flattened row-major), handy for gathering directions.
    """

    index: int
    slices: tuple[slice, ...]
    dims: tuple[int, ...]
    offset: int

    @property
    def order(self) -> int:
        """Number of Kronecker factors (the tensor order of the block)."""
        return len(self.dims)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)


@dataclasses.dataclass(frozen=True)
class ParameterPlan:
    """How one parameter is preconditioned.

    ``preconditioned`` is False for grafted-only parameters, whose
    ``merged_shape`` and ``blocks`` are then empty.
    """

    shape: tuple[int, ...]
    preconditioned: bool
    merged_shape: tuple[int, ...]
    blocks: tuple[Block, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, order=True)
class BlockRef:
    """A block named by the position of its parameter and its index within it."""

    parameter: int
    block: int


def merge_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Squeezes size-1 dims, then merges neighbours while the product is ``<= max_dim``.

    Greedy from the left: each dimension joins the current group if the
    group's product times it stays within ``max_dim``, else starts a new group.
    A dimension larger than ``max_dim`` stays alone (it is split later). An
    empty result (every dim was 1, or 0-d) is returned as ``()``.
    """
    _check_shape(shape)
    if max_dim < 1:
        raise ShampooBlockingError(f"max_dim={max_dim!r} must be >= 1")
    merged: list[int] = []
    for dim in shape:
        if dim == 1:
            continue
        if merged and merged[-1] * dim <= max_dim:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(merged)


def split_dim(size: int, max_dim: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` ranges of at most ``max_dim`` covering ``range(size)``."""
    if size < 1 or max_dim < 1:
        raise ShampooBlockingError(f"cannot split size={size!r} into chunks of max_dim={max_dim!r}")
    return tuple((start, min(start + max_dim, size)) for start in range(0, size, max_dim))


def plan_parameter(shape: Sequence[int], config: ShampooConfig) -> ParameterPlan:
    """The blocks of a parameter of this shape (see the module docstring)."""
    shape = _check_shape(shape)
    grafted_only = ParameterPlan(shape=shape, preconditioned=False, merged_shape=(), blocks=())
    if math.prod(shape) < 2 or any(dim >= config.preconditioning_dim_limit for dim in shape):
        return grafted_only
    merged_shape = merge_dims(shape, config.max_preconditioner_dim)
    chunks_per_dim = [split_dim(dim, config.max_preconditioner_dim) for dim in merged_shape]
    blocks: list[Block] = []
    offset = 0
    for index, ranges in enumerate(itertools.product(*chunks_per_dim)):
        dims = tuple(stop - start for start, stop in ranges)
        slices = tuple(slice(start, stop) for start, stop in ranges)
        blocks.append(Block(index=index, slices=slices, dims=dims, offset=offset))
        offset += math.prod(dims)
    return ParameterPlan(
        shape=shape, preconditioned=True, merged_shape=merged_shape, blocks=tuple(blocks)
    )


# The v0.5 submission's row-wise optimizer, which takes the parameters with a
# dimension of at least preconditioning_dim_limit, blocks them by this.
LARGE_PARAMETER_BLOCK = 524_288


@functools.lru_cache(maxsize=4096)
def grafting_blocks(
    shape: tuple[int, ...], config: ShampooConfig
) -> tuple[tuple[int, ...], tuple[tuple[slice, ...], ...]]:
    """Merged shape and block slices over which normalized grafting takes its norms.

    The Shampoo blocks for preconditioned parameters; for grafted-only large
    ones the v0.5 submission's row-wise blocks (``LARGE_PARAMETER_BLOCK``);
    one block for parameters of fewer than two elements.
    """
    plan = plan_parameter(shape, config)
    if plan.preconditioned:
        return plan.merged_shape, tuple(block.slices for block in plan.blocks)
    numel = math.prod(shape)
    if numel < 2 or not any(d >= config.preconditioning_dim_limit for d in shape):
        return (numel,), ((slice(0, numel),),)
    merged = merge_dims(shape, LARGE_PARAMETER_BLOCK) or (numel,)
    chunks = [split_dim(d, LARGE_PARAMETER_BLOCK) for d in merged]
    slices = tuple(tuple(slice(a, b) for a, b in ranges) for ranges in itertools.product(*chunks))
    return merged, slices


def plan_parameters(shapes: Sequence[Sequence[int]], config: ShampooConfig) -> list[ParameterPlan]:
    """:func:`plan_parameter` for each shape, in order."""
    return [plan_parameter(shape, config) for shape in shapes]


def block_cost(dims: Sequence[int]) -> int:
    """Work of one root recomputation for a block: the sum of ``d³`` over its factors."""
    return sum(int(d) ** 3 for d in dims)


def assign_blocks(
    plans: Sequence[ParameterPlan], world_size: int
) -> tuple[tuple[BlockRef, ...], ...]:
    """The blocks each rank owns, balanced by :func:`block_cost`.

    Returns one tuple per rank (index = rank), each sorted by
    ``(parameter, block)``. Every preconditioned block appears exactly once.
    Deterministic: identical on every rank and in both twins.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ShampooBlockingError(f"world_size={world_size!r} must be an integer >= 1")
    refs = [
        (block_cost(block.dims), BlockRef(p, block.index))
        for p, plan in enumerate(plans)
        for block in plan.blocks
    ]
    # Largest first; equal costs keep their natural order.
    refs.sort(key=lambda item: (-item[0], item[1]))
    loads = [0] * world_size
    owned: list[list[BlockRef]] = [[] for _ in range(world_size)]
    for cost, ref in refs:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += cost
        owned[rank].append(ref)
    return tuple(tuple(sorted(refs_of_rank)) for refs_of_rank in owned)


def rank_loads(
    plans: Sequence[ParameterPlan], assignment: Sequence[Sequence[BlockRef]]
) -> tuple[int, ...]:
    """Total :func:`block_cost` per rank for an assignment (for diagnostics and tests)."""
    return tuple(
        sum(block_cost(plans[ref.parameter].blocks[ref.block].dims) for ref in refs)
        for refs in assignment
    )


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as error:
        raise ShampooBlockingError(f"shape={shape!r} must be a sequence of integers") from error
    if any(d < 0 for d in dims):
        raise ShampooBlockingError(f"shape={dims!r} has a negative dimension; expected sizes >= 0")
    return dims
