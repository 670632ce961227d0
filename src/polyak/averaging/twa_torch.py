"""Trainable Weight Averaging (TWA-t) of a torch module's checkpoints.

TWA (Li et al., "Trainable Weight Averaging", ICLR 2023) learns the averaging
coefficients instead of fixing them. The checkpoints θ₁..θ_K span an affine
subspace through their mean θ̄; TWA trains only inside it:

    θ(α) = θ̄ + Σ_b P_bᵀ α_b

where the rows of P_b are an orthonormal basis of the centered checkpoints
(θ_i − θ̄) restricted to block b (one block for the whole model, or one per
parameter tensor / group of tensors in the layer-wise variant). Learning α is
the same as training θ with projected gradients g ← Pᵀ(P g): SGD on α with
an orthonormal P takes exactly those steps.

How it is built and fitted:

- θ̄ is the fp32 mean of the snapshots, as LAWA computes it; α = 0 at the
  start, so before any fitting the result is uniform LAWA (to fp32 rounding).
- The basis comes from θ_i − θ̄ for i < K (the K-th is their negated sum, so
  it adds no direction) by classical Gram–Schmidt applied twice per vector,
  which keeps fp32 rows orthonormal to rounding. A vector keeping less than
  :data:`DEPENDENCE_TOLERANCE` of its norm after the projections spans
  nothing new (duplicate checkpoints) and is dropped.
- Memory: θ̄ plus K − 1 basis rows, K × D fp32 numbers for D weights.
  Under ``torch.distributed`` with more than one rank, every rank holds the
  same 1/world slice of θ̄ and of every basis row (``flat_layout_torch``,
  the slicing of the sharded LAWA placement). Inner products are local partial sums all-reduced in
  coefficient space, the coefficient gradient P g is one all-reduce of a
  (K − 1) × blocks matrix, and the weights are all-gathered after each
  update. The result equals the single-process one to rounding, provided the
  gradients are identical on every rank (a DDP-wrapped module, or a loss that
  is all-reduced).
- The coefficients are fitted with Adam, its learning rate decayed to zero by
  a cosine over ``steps`` steps. They are measured in units of the
  checkpoints' spread (the RMS distance of a checkpoint from θ̄ in the
  block), so ``lr`` does not depend on the scale of the weights or the loss:
  ``lr = 0.1`` moves each coefficient by up to about 10% of that spread per step.
- Only training data is used (TWA-t). The steps cycle through the given
  batches; afterwards the mean loss at the fitted weights is compared with
  the one at θ̄, and **if the fit ended worse (or not finite), the uniform
  average θ̄ is returned instead**. The comparison is made on
  ``validation_batches`` when given: batches none of the checkpoints has
  trained on. The fit batches are not enough for it: the newest checkpoint
  has just trained on them, so a fit that moves towards it lowers their loss
  while the held-out loss rises. Without validation batches the comparison
  uses the fit batches, and TWA is never worse than LAWA on those.
- Buffers are saved before the fit and restored after it, so a loss that
  updates BatchNorm statistics leaves no trace. Then, if the module has
  BatchNorm layers (and ``recompute_batch_norm``), their statistics are
  recomputed for the result: reset, then forward passes in train mode over
  the batches without gradients, with ``momentum=None`` so the running
  statistics are the cumulative average over the batches (all-reduced over
  ranks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from polyak.averaging.config import TWAConfig, TWAError
from polyak.averaging.flat_layout_torch import FlatLayout
from polyak.distributed_torch import all_reduce_sum, rank_and_world, unwrap_module

__all__ = [
    "TWAConfig",
    "TWAError",
    "TWAResult",
    "TWASubspace",
    "batch_norm_layers",
    "build_subspace",
    "fit_twa",
    "recompute_batch_norm",
    "subspace_from_shards",
]
# A centered checkpoint that keeps less than this fraction of its norm after
# the earlier directions are projected out adds only rounding noise (exact
# duplicates leave ~1e-6 in fp32); directions that small do not matter for
# the average either.
DEPENDENCE_TOLERANCE = 1e-3

_ADAM_BETAS = (0.9, 0.999)


def blocks_for(num_tensors: int, config: TWAConfig) -> list[list[int]]:
    """The coefficient blocks, as lists of tensor indices, that ``config`` asks for."""
    per_block = config.tensors_per_block
    if per_block == 0 or num_tensors == 0:
        return [list(range(num_tensors))]
    return [
        list(range(start, min(start + per_block, num_tensors)))
        for start in range(0, num_tensors, per_block)
    ]


# -- the subspace -------------------------------------------------------------------


class TWASubspace:
    """θ̄ and an orthonormal basis per block of the centered checkpoints (this rank's slice).

    ``basis`` is (K − 1) × shard: for block b, row i restricted to the block's
    columns is the i-th basis vector of that block, or zero if the i-th
    centered checkpoint added no direction there (``kept[i, b]`` False).
    ``transform[b]`` maps centered checkpoints to basis rows (P_b = T_b C_b),
    which turns coefficients back into weights over the checkpoints.
    """

    def __init__(
        self,
        layout: FlatLayout,
        local_snapshots: Sequence[torch.Tensor],
        blocks: Sequence[Sequence[int]],
    ) -> None:
        # ``local_snapshots`` may convert each item on access (see _LocalSnapshots):
        # they are read one at a time, so only θ̄ and the rows stay in memory.
        if len(local_snapshots) < 1:
            raise TWAError("TWA needs at least one checkpoint")
        self.layout = layout
        self.num_checkpoints = len(local_snapshots)
        self.blocks = [list(block) for block in blocks]
        self.segments = [layout.segments(block) for block in self.blocks]
        first = local_snapshots[0]
        device = first.device
        num_rows = self.num_checkpoints - 1
        num_blocks = len(self.blocks)

        self.mean = first.float().clone()
        for k in range(1, self.num_checkpoints):
            self.mean.add_(local_snapshots[k].float())
        self.mean.div_(self.num_checkpoints)

        self.basis = torch.empty(num_rows, layout.shard, dtype=torch.float32, device=device)
        for k in range(num_rows):
            torch.sub(local_snapshots[k].float(), self.mean, out=self.basis[k])
        # Squared norms of all K centered checkpoints per block, for the spread
        # and the dependence test, in one reduction.
        last = local_snapshots[num_rows].float() - self.mean
        squares = torch.cat([self._block_squares(self.basis), self._block_squares(last[None])])
        squares = all_reduce_sum(squares)
        del last
        self.spread = torch.sqrt(squares.sum(dim=0) / self.num_checkpoints)

        self.kept = torch.zeros(num_rows, num_blocks, dtype=torch.bool)
        self.transform = torch.zeros(num_blocks, num_rows, num_rows, dtype=torch.float64)
        for i in range(num_rows):
            self._orthonormalize_row(i, squares[i])

    # -- per-block linear algebra on the local columns --------------------------------

    def _block_dots(self, rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``rows @ vector`` per block: (len(rows), blocks), this rank's partial sums."""
        out = torch.zeros(rows.shape[0], len(self.blocks), dtype=torch.float32, device=rows.device)
        for b, segments in enumerate(self.segments):
            for start, end in segments:
                out[:, b] += rows[:, start:end] @ vector[start:end]
        return out

    def _block_squares(self, rows: torch.Tensor) -> torch.Tensor:
        """Squared norms per row and block: (len(rows), blocks), partial sums."""
        out = torch.zeros(rows.shape[0], len(self.blocks), dtype=torch.float32, device=rows.device)
        for b, segments in enumerate(self.segments):
            for start, end in segments:
                # A reduction, not rows.square(): no temporary of the rows' size.
                out[:, b] += torch.linalg.vector_norm(rows[:, start:end], dim=1).square()
        return out

    def _add_combination(
        self, vector: torch.Tensor, rows: torch.Tensor, coefficients: torch.Tensor
    ) -> None:
        """``vector += rowsᵀ coefficients[:, b]`` on each block's columns."""
        for b, segments in enumerate(self.segments):
            for start, end in segments:
                vector[start:end].addmv_(rows[:, start:end].T, coefficients[:, b])

    def _scale_blocks(self, vector: torch.Tensor, scale: torch.Tensor) -> None:
        for b, segments in enumerate(self.segments):
            for start, end in segments:
                vector[start:end].mul_(scale[b])

    def _orthonormalize_row(self, i: int, original_squares: torch.Tensor) -> None:
        vector = self.basis[i]
        previous = self.basis[:i]
        transform_row = torch.zeros(len(self.blocks), self.basis.shape[0], dtype=torch.float64)
        transform_row[:, i] = 1.0
        if i > 0:
            # Classical Gram–Schmidt twice: one reduction per pass, and fp32
            # rows orthonormal to rounding ("twice is enough").
            for _ in range(2):
                projections = all_reduce_sum(self._block_dots(previous, vector))
                self._add_combination(vector, previous, -projections)
                transform_row -= torch.einsum(
                    "ib,bij->bj", projections.double().cpu(), self.transform[:, :i, :]
                )
        squares = all_reduce_sum(self._block_squares(vector[None])[0])
        keep = (squares > (DEPENDENCE_TOLERANCE**2) * original_squares) & (squares > 0)
        scale = torch.where(keep, squares.rsqrt(), torch.zeros_like(squares))
        self._scale_blocks(vector, scale)
        self.kept[i] = keep.cpu()
        self.transform[:, i, :] = transform_row * scale.double().cpu()[:, None]

    # -- coefficients ---------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.basis.shape[0]

    @property
    def num_directions(self) -> list[int]:
        """How many basis vectors each block has."""
        return [int(n) for n in self.kept.sum(dim=0)]

    def weights(self, coefficients: torch.Tensor) -> torch.Tensor:
        """θ̄ + Σ_b P_bᵀ α_b on this rank's slice, α of shape (K − 1, blocks)."""
        out = self.mean.clone()
        if self.num_rows:
            self._add_combination(out, self.basis, coefficients.to(out.device))
        return out

    def coefficient_gradient(self, local_gradient: torch.Tensor) -> torch.Tensor:
        """P_b g_b for every block, reduced over ranks: (K − 1, blocks)."""
        return all_reduce_sum(self._block_dots(self.basis, local_gradient))

    def checkpoint_weights(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per block, the weights w (summing to 1) with θ_b = Σ_i w_i θ_i,b: (blocks, K)."""
        num = self.num_checkpoints
        weights = torch.full((len(self.blocks), num), 1.0 / num, dtype=torch.float64)
        if self.num_rows == 0:
            return weights
        # θ = θ̄ + Σ_i u_i (θ_i − θ̄) over i < K, with u_b = T_bᵀ α_b.
        u = torch.einsum("bij,ib->bj", self.transform, coefficients.double().cpu())
        weights[:, : self.num_rows] += u
        weights -= u.sum(dim=1, keepdim=True) / num
        return weights


# -- fitting ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TWAResult:
    """What a fit did. The module holds the chosen weights.

    ``chosen`` is ``"twa"`` or ``"uniform"`` (the fit did not beat θ̄ on the
    validation batches, or its own without them, or there was nothing to
    fit). Losses are means over those batches (``None`` when no fit ran).
    ``coefficients`` is α (orthonormal-basis units, (K − 1) × blocks);
    ``checkpoint_weights`` the equivalent weights over the K checkpoints per
    block, each row summing to 1.
    """

    chosen: str
    uniform_loss: float | None
    fitted_loss: float | None
    step_losses: tuple[float, ...]
    coefficients: torch.Tensor
    checkpoint_weights: torch.Tensor
    num_directions: tuple[int, ...]
    batch_norm_recomputed: bool

    def passes(self, num_batches: int, num_held_out: int) -> int:
        """What this result cost in passes over a batch (``TWAConfig.budget``'s
        unit), given the numbers of fit and held-out batches it was made with:
        the fit's steps, two judging passes per held-out batch when a fit was
        judged, and one per batch that re-estimated BatchNorm statistics."""
        judged = 2 * num_held_out if self.uniform_loss is not None else 0
        recomputed = num_batches + num_held_out if self.batch_norm_recomputed else 0
        return len(self.step_losses) + judged + recomputed


LossFn = Callable[..., torch.Tensor]


def build_subspace(
    snapshots: Sequence[Sequence[torch.Tensor]],
    shapes: Sequence[torch.Size],
    config: TWAConfig,
    *,
    blocks: Sequence[Sequence[int]] | None = None,
    device: torch.device | None = None,
) -> TWASubspace:
    """The subspace of K full snapshots (lists of tensors in ``module.parameters()`` order).

    Under ``torch.distributed`` (world > 1) each rank keeps only its slice.
    """
    if not snapshots:
        raise TWAError("TWA needs at least one checkpoint; got an empty list")
    rank, world = rank_and_world()
    layout = FlatLayout(shapes, rank, world)
    for k, snapshot in enumerate(snapshots):
        if len(snapshot) != len(layout.shapes):
            raise TWAError(
                f"checkpoint {k} holds {len(snapshot)} tensors, the module has "
                f"{len(layout.shapes)} parameters"
            )
        for index, (tensor, shape) in enumerate(zip(snapshot, layout.shapes)):
            if tensor.shape != shape:
                raise TWAError(
                    f"checkpoint {k}, tensor {index}: shape {tuple(tensor.shape)} does not fit "
                    f"the parameter's {tuple(shape)}"
                )
    device = device or (snapshots[0][0].device if snapshots[0] else torch.device("cpu"))
    local = _LocalSnapshots(snapshots, layout, device)
    return TWASubspace(layout, local, _checked_blocks(blocks, len(shapes), config))


class _LocalSnapshots(Sequence[torch.Tensor]):
    """This rank's fp32 slice of each full snapshot, made when it is read."""

    def __init__(
        self, snapshots: Sequence[Sequence[torch.Tensor]], layout: FlatLayout, device: torch.device
    ) -> None:
        self._snapshots, self._layout, self._device = snapshots, layout, device

    def __len__(self) -> int:
        return len(self._snapshots)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._layout.local(self._snapshots[index], self._device)


def subspace_from_shards(
    shards: Sequence[torch.Tensor],
    shapes: Sequence[torch.Size],
    config: TWAConfig,
    *,
    blocks: Sequence[Sequence[int]] | None = None,
) -> TWASubspace:
    """The subspace from this rank's flat slices of K snapshots, as a sharded window keeps them."""
    if not shards:
        raise TWAError("TWA needs at least one checkpoint; got no shards")
    rank, world = rank_and_world()
    layout = FlatLayout(shapes, rank, world)
    for k, shard in enumerate(shards):
        if shard.ndim != 1 or shard.shape[0] < layout.shard:
            raise TWAError(
                f"shard {k} of shape {tuple(shard.shape)} is not a flat slice of "
                f"{layout.shard} elements"
            )
    local = [shard[: layout.shard] for shard in shards]
    return TWASubspace(layout, local, _checked_blocks(blocks, len(shapes), config))


def _checked_blocks(
    blocks: Sequence[Sequence[int]] | None, num_tensors: int, config: TWAConfig
) -> list[list[int]]:
    if blocks is None:
        return blocks_for(num_tensors, config)
    seen = sorted(index for block in blocks for index in block)
    if seen != list(range(num_tensors)) or any(len(block) == 0 for block in blocks):
        raise TWAError(
            f"blocks {[list(b) for b in blocks]} must split the tensor indices "
            f"0..{num_tensors - 1} into non-empty groups, each index once"
        )
    return [list(block) for block in blocks]


def fit_twa(
    module: nn.Module,
    snapshots: Sequence[Sequence[torch.Tensor]] | TWASubspace,
    config: TWAConfig,
    loss_fn: LossFn,
    batches: Sequence[Any] | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    blocks: Sequence[Sequence[int]] | None = None,
    validation_batches: Sequence[Any] | None = None,
    validation_loss_fn: LossFn | None = None,
) -> TWAResult:
    """Fits the averaging coefficients and loads the resulting weights into ``module``.

    ``loss_fn(module, batch)`` (or ``loss_fn(module)`` when ``batches`` is
    None) returns a scalar training loss to differentiate; it should not
    depend on randomness (no dropout) so that the comparison with θ̄ is fair.
    ``forward_fn(module, batch)`` runs a train-mode forward pass that updates
    BatchNorm statistics (default: ``loss_fn``); it receives the unwrapped
    module, so DDP does not broadcast rank 0's statistics in between.
    ``snapshots`` are K lists of tensors in ``module.parameters()`` order, or
    a :class:`TWASubspace` built from them. Under DDP pass the wrapped module
    and call this on every rank. ``validation_batches`` (not trained on by
    any checkpoint) decide between the fit and θ̄, by ``validation_loss_fn``
    (default ``loss_fn``; the metric the eval reports is the better judge);
    BatchNorm statistics are recomputed over the fit and the validation batches.
    """
    parameters = list(module.parameters())
    shapes = [p.shape for p in parameters]
    if isinstance(snapshots, TWASubspace):
        subspace = snapshots
        if subspace.layout.shapes != [torch.Size(s) for s in shapes]:
            raise TWAError(
                "the subspace was built for parameters of other shapes than the module's"
            )
    else:
        device = parameters[0].device if parameters else None
        subspace = build_subspace(snapshots, shapes, config, blocks=blocks, device=device)
    if batches is not None and len(batches) == 0:
        raise TWAError("fit_twa got an empty list of batches; pass at least one or None")
    if validation_batches is not None and len(validation_batches) == 0:
        raise TWAError("fit_twa got an empty list of validation batches; pass at least one or None")
    calls: list[Callable[[nn.Module], Any]] = (
        [loss_fn] if batches is None else [_bind(loss_fn, batch) for batch in batches]
    )
    judge_fn = validation_loss_fn or loss_fn
    judges = (
        calls
        if validation_batches is None
        else [_bind(judge_fn, batch) for batch in validation_batches]
    )
    layout = subspace.layout
    world = layout.world
    num_blocks = len(subspace.blocks)
    coefficients = torch.zeros(subspace.num_rows, num_blocks, dtype=torch.float32)

    buffers = list(module.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    was_training = module.training
    # TWA-t trains: train-mode forward passes (BatchNorm on batch statistics).
    module.train()

    def load(alpha: torch.Tensor) -> None:
        layout.scatter_into(subspace.weights(alpha), parameters)

    def mean_loss() -> float:
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            for judge in judges:
                total += judge(module).detach().double().cpu()
            total /= len(judges)
            if world > 1:
                # Every rank must make the same choice.
                dist.all_reduce(total)
                total /= world
        return float(total)

    step_losses: list[torch.Tensor] = []
    uniform_loss = fitted_loss = None
    chosen = "uniform"
    fit = config.steps > 0 and sum(subspace.num_directions) > 0
    if fit:
        load(coefficients)
        uniform_loss = mean_loss()
        # Coefficients in units of each block's spread: α_b = spread_b · β_b.
        spread = subspace.spread.cpu().float()
        scale = torch.where(spread > 0, spread, torch.ones_like(spread))
        beta = torch.zeros_like(coefficients, requires_grad=True)
        optimizer = torch.optim.Adam([beta], lr=config.lr, betas=_ADAM_BETAS)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / config.steps))
        )
        for step in range(config.steps):
            load(beta.detach() * scale)
            for p in parameters:
                p.grad = None
            loss = calls[step % len(calls)](module)
            loss.backward()
            step_losses.append(loss.detach().float())  # read back once, after the fit
            gradient = layout.local([p.grad for p in parameters], subspace.mean.device)
            beta.grad = subspace.coefficient_gradient(gradient).cpu() * scale
            optimizer.step()
            schedule.step()
        for p in parameters:
            p.grad = None
        candidate = beta.detach() * scale
        load(candidate)
        fitted_loss = mean_loss()
        if math.isfinite(fitted_loss) and fitted_loss <= uniform_loss:
            chosen, coefficients = "twa", candidate
        else:
            load(coefficients)
    else:
        load(coefficients)

    with torch.no_grad():
        for buffer, saved in zip(buffers, saved_buffers):
            buffer.copy_(saved)
    recomputed = False
    if config.recompute_batch_norm:
        forward = forward_fn or loss_fn
        every_batch = [*(batches or ()), *(validation_batches or ())]
        forwards = [forward] if batches is None else [_bind(forward, b) for b in every_batch]
        recomputed = recompute_batch_norm(module, forwards, world)
    module.train(was_training)
    return TWAResult(
        chosen=chosen,
        uniform_loss=uniform_loss,
        fitted_loss=fitted_loss,
        step_losses=tuple(torch.stack(step_losses).cpu().tolist()) if step_losses else (),
        coefficients=coefficients.clone(),
        checkpoint_weights=subspace.checkpoint_weights(coefficients),
        num_directions=tuple(subspace.num_directions),
        batch_norm_recomputed=recomputed,
    )


def uniform_result(
    module: nn.Module,
    num_checkpoints: int,
    config: TWAConfig,
    forward_fn: Callable[[nn.Module, Any], Any],
    batches: Sequence[Any],
) -> TWAResult:
    """What :func:`fit_twa` returns without a fit, for a module that already
    holds the uniform average: BatchNorm statistics recomputed if asked."""
    recomputed = False
    if config.recompute_batch_norm:
        was_training = module.training
        recomputed = recompute_batch_norm(module, [_bind(forward_fn, b) for b in batches])
        module.train(was_training)
    return TWAResult(
        chosen="uniform",
        uniform_loss=None,
        fitted_loss=None,
        step_losses=(),
        coefficients=torch.zeros(max(0, num_checkpoints - 1), 1),
        checkpoint_weights=torch.full(
            (1, num_checkpoints), 1.0 / num_checkpoints, dtype=torch.float64
        ),
        num_directions=(),
        batch_norm_recomputed=recomputed,
    )


def _bind(function: Callable[..., Any], batch: Any) -> Callable[[nn.Module], Any]:
    return lambda module: function(module, batch)


def batch_norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` that track running statistics."""
    return [
        m
        for m in unwrap_module(module).modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recompute_batch_norm(
    module: nn.Module, forwards: Sequence[Callable[[nn.Module], Any]], world: int | None = None
) -> bool:
    """Resets BatchNorm statistics and re-estimates them over ``forwards``.

    Each forward runs in train mode on the unwrapped module; ``momentum=None``
    makes the running statistics the plain average over the passes. Under
    DDP the per-rank statistics are averaged over ranks. Returns whether the
    module has BatchNorm layers that track statistics.
    """
    inner = unwrap_module(module)
    layers = batch_norm_layers(inner)
    if not layers or not forwards:
        return False
    momenta = [m.momentum for m in layers]
    was_training = inner.training
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
        inner.train()
        for forward in forwards:
            forward(inner)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        inner.train(was_training)
    world = rank_and_world()[1] if world is None else world
    if world > 1:
        for layer in layers:
            for statistic in (layer.running_mean, layer.running_var):
                if statistic is not None:
                    dist.all_reduce(statistic)
                    statistic.div_(world)
    return True
