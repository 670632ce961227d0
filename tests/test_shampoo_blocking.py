"""Shampoo block planning: merges, splits, limits and the rank assignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak.optim.shampoo_blocking import (
    BlockRef,
    ShampooBlockingError,
    assign_blocks,
    block_cost,
    merge_dims,
    plan_parameter,
    plan_parameters,
    rank_loads,
    split_dim,
)
from polyak.optim.shampoo_config import ShampooConfig


def config(max_dim: int = 1024, limit: int = 1_000_000) -> ShampooConfig:
    return ShampooConfig(max_preconditioner_dim=max_dim, preconditioning_dim_limit=limit)


@pytest.mark.parametrize(
    ("shape", "max_dim", "expected"),
    [
        ((3, 3, 64, 64), 1024, (576, 64)),
        ((64, 1, 3, 3), 1024, (576,)),
        ((1, 1, 512), 1024, (512,)),
        ((2048, 4), 1024, (2048, 4)),
        ((4, 2048), 1024, (4, 2048)),
        ((8, 8, 8, 8, 8), 64, (64, 64, 8)),
        ((1000, 2), 1024, (1000, 2)),
        ((512, 2), 1024, (1024,)),
        ((1, 1), 1024, ()),
        ((), 1024, ()),
    ],
)
def test_merge_dims_squeezes_and_merges_left_to_right(shape, max_dim, expected):
    assert merge_dims(shape, max_dim) == expected


def test_split_dim_chunks():
    assert split_dim(2500, 1024) == ((0, 1024), (1024, 2048), (2048, 2500))
    assert split_dim(7, 7) == ((0, 7),)
    with pytest.raises(ShampooBlockingError, match="size=0"):
        split_dim(0, 4)


def test_plan_matrix_larger_than_block_is_split_into_grid():
    plan = plan_parameter((2500, 300), config())
    assert plan.preconditioned
    assert plan.merged_shape == (2500, 300)
    assert [b.dims for b in plan.blocks] == [(1024, 300), (1024, 300), (452, 300)]
    assert plan.blocks[2].slices == (slice(2048, 2500), slice(0, 300))
    assert [b.offset for b in plan.blocks] == [0, 1024 * 300, 2048 * 300]


def test_plan_two_large_dims_grid_is_row_major():
    plan = plan_parameter((5, 3), config(max_dim=2))
    assert plan.merged_shape == (5, 3)
    assert [b.dims for b in plan.blocks] == [(2, 2), (2, 1), (2, 2), (2, 1), (1, 2), (1, 1)]
    assert plan.blocks[3].slices == (slice(2, 4), slice(2, 3))


def test_plan_vector_is_order_one():
    plan = plan_parameter((300,), config(max_dim=128))
    assert [b.dims for b in plan.blocks] == [(128,), (128,), (44,)]
    assert all(b.order == 1 for b in plan.blocks)


def test_plan_grafted_only_for_huge_dims_scalars_and_empty():
    assert not plan_parameter((1_000_000, 16), config()).preconditioned
    assert not plan_parameter((16, 2_000_000), config()).preconditioned
    assert plan_parameter((999_999, 16), config()).preconditioned
    assert not plan_parameter((100, 4), config(limit=100)).preconditioned
    for shape in [(), (1,), (1, 1, 1), (0, 5)]:
        plan = plan_parameter(shape, config())
        assert not plan.preconditioned
        assert plan.blocks == () and plan.merged_shape == ()


def test_bad_shapes_and_world_sizes_fail_clearly():
    with pytest.raises(ShampooBlockingError, match="negative"):
        plan_parameter((3, -1), config())
    with pytest.raises(ShampooBlockingError, match="world_size=0"):
        assign_blocks([], 0)


def test_block_cost_is_sum_of_cubes():
    assert block_cost((10, 3)) == 1000 + 27
    assert block_cost((7,)) == 343


def test_assign_blocks_greedy_largest_first_to_least_loaded():
    # With blocks of 10: (10, 10) costs 2000, (3, 5) 27 + 125, (6,) 216, (4,) 64.
    plans = plan_parameters([(10, 10), (3, 5), (6,), (4,)], config(max_dim=10))
    assignment = assign_blocks(plans, 2)
    # 2000 -> rank 0; then 216, 152 and 64 all go to the less loaded rank 1.
    assert assignment == (
        (BlockRef(0, 0),),
        (BlockRef(1, 0), BlockRef(2, 0), BlockRef(3, 0)),
    )
    assert rank_loads(plans, assignment) == (2000, 432)
    assert assign_blocks(plans, 1) == (tuple(BlockRef(p, 0) for p in range(4)),)


shapes_strategy = st.lists(
    st.lists(st.integers(min_value=1, max_value=40), min_size=0, max_size=4).map(tuple),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_strategy, max_dim=st.integers(1, 50), world=st.integers(1, 5))
def test_blocks_tile_each_parameter_exactly_once(shapes, max_dim, world):
    cfg = config(max_dim=max_dim, limit=35)
    plans = plan_parameters(shapes, cfg)
    for shape, plan in zip(shapes, plans, strict=True):
        if not plan.preconditioned:
            assert math.prod(shape) < 2 or max(shape) >= 35
            continue
        assert math.prod(plan.merged_shape) == math.prod(shape)
        # Merged dims that were merged respect the limit; lone dims may exceed it.
        covered = np.zeros(plan.merged_shape, dtype=np.int64)
        offset = 0
        for index, block in enumerate(plan.blocks):
            assert block.index == index
            assert block.offset == offset
            assert all(1 <= d <= max_dim for d in block.dims)
            assert covered[block.slices].shape == block.dims
            covered[block.slices] += 1
            offset += block.numel
        assert (covered == 1).all()
    assignment = assign_blocks(plans, world)
    all_refs = sorted(ref for refs in assignment for ref in refs)
    expected = sorted(BlockRef(p, b.index) for p, plan in enumerate(plans) for b in plan.blocks)
    assert all_refs == expected
    loads = rank_loads(plans, assignment)
    costs = [block_cost(b.dims) for plan in plans for b in plan.blocks]
    if costs:
        # Greedy least-loaded assignment keeps the spread within one block's cost.
        assert max(loads) - min(loads) <= max(costs)
    assert assign_blocks(plans, world) == assignment
