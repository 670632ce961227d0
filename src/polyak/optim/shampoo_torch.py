"""Shampoo for PyTorch: blocked Kronecker-factored preconditioning with grafting.

The algorithm is that of the AlgoPerf v0.5 external-tuning winner, Distributed
Shampoo (Shi et al., 2023), as its submission configures it; its trajectories
on small problems are recorded in ``tests/fixtures/shampoo_anchor.json`` and
``tests/test_shampoo_anchor.py`` holds this module to them. One step, per
parameter (t counts the steps this parameter has taken, from 1)::

    g                                         raw gradient
    m ← β1·m + (1−β1)·g                       filtered gradient (skipped when β1 = 0)
    m̃ = (β1·m + (1−β1)·g) / (1−β1ᵗ)           NAdam look-ahead (use_nadam), else m / (1−β1ᵗ)
    v ← β2ᵍ·v + (1−β2ᵍ)·ĝ²                    grafting's second moment (ĝ = g, or g/‖g_B‖
                                              per block with use_normalized_grafting)
    a = m̃ / (√(v / (1−β2ᵍᵗ)) + εᵍ)            Adam grafting; RMSprop: no correction;
                                              AdaGrad: v summed; SGD: a = m̃

and, per block B of a preconditioned parameter (see
:mod:`polyak.optim.shampoo_blocking`), with one factor per block dimension::

    Lᵢ ← β2·Lᵢ + (1−β2)·G₍ᵢ₎G₍ᵢ₎ᵀ               mode-i unfolding of the raw gradient block
    Qᵢ = (Lᵢ/(1−β2ᵗ) + ε'·I)^(−η/(2k))         at t = start and every multiple of
                                              precondition_frequency after it
    p_B = m̃_B ×₁ Q₁ ×₂ … ×ₖ Qₖ                 Shampoo direction (from t = start)
    d_B = p_B · ‖a'_B‖ / ‖p_B‖                 grafted to the per-block norm of a
                                              (a' = the grafting of ĝ when normalized)

then, for every parameter::

    d ← d + wd·θ                               decoupled weight decay
    b ← μ·b + (1−μ)·d;  d ← (1−μ)·d + μ·b      optional EMA momentum, Nesterov (μ = momentum)
    θ ← θ − lr·d

Before ``start_preconditioning_step`` (and for a block whose roots were never
computed successfully) the grafted direction is used alone. Parameters with a
dimension ``>= preconditioning_dim_limit`` are grafted only, with Adam grafting
whatever ``grafting`` says (the submission's row-wise optimizer for Criteo's
embedding); single-element parameters are grafted only too (for them the
grafted Shampoo direction is the grafted direction).

Numerics. Deliberate differences from the v0.5 submission, both switchable
back (``preconditioner_precision="float32"``, ``max_root_condition=0``):

- Statistics are accumulated and eigendecomposed in float64
  (``preconditioner_precision``); roots and directions stay in float32. A
  factor wider than the number of updates so far is rank-deficient; in
  float32 its null eigenvalues are round-off of ~1e-7·λmax, above ε = 1e-8,
  and round-off decides the step (the submission's own float32 and float64
  runs differ by up to 3% within 60 steps on the recorded problems).
- ``ε' = max(ε, λmax·c^(−2k/η))`` caps each root's condition number at
  ``c = max_root_condition`` (100): no direction is amplified more than 100
  times the top one, so the float32 round-off of m̃ outside the span of past
  gradients (~6e-8) moves a step by less than 1e-5. With ε alone a vector's
  root amplifies that null space by (λmax/ε)^(1/2), up to 1e5.
- As in the submission, a negative smallest eigenvalue shifts the spectrum
  up to 0 before ε' is added. A failed or non-finite eigh keeps the
  previous root and increments ``root_failures`` of the block (a float32
  eigh is retried in float64 first).
- A parameter whose gradient norm is non-finite or at least half the square
  root of its dtype's largest value (9.2e18 in float32) is left untouched for
  that step, state and parameter alike, its ``skipped_steps`` is incremented
  and a warning is logged (at most once a minute); :meth:`Shampoo.metrics`
  reports the counters for the training log. Below that bound every new
  statistic of an EMA (β2 < 1) is finite, because a PSD factor's entries are
  bounded by its trace. Summed statistics (β2 = 1) are also checked per block
  against their predicted trace; a block that would overflow keeps its old
  statistics (``skipped_statistics``). These checks cost one host
  synchronisation per step.
- If a Shampoo direction still overflows (only conceivable with extreme
  roots), the step falls back to the grafted directions for the whole
  parameter group (``direction_fallbacks``); one more synchronisation.

Under ``torch.distributed`` (world size > 1) blocks are spread over ranks by
:func:`~polyak.optim.shampoo_blocking.assign_blocks`. Each rank updates the
statistics, roots and directions of its blocks only, writes the directions into
a zero buffer and one ``all_reduce(SUM)`` per parameter group gives every rank
every direction; adding zeros is exact, so the result equals single-process
Shampoo bit for bit when the gradients are identical, as they are under DDP.
The cheap elementwise parts run on every rank.

Checkpoints: ``state_dict()`` holds the blocks this rank owns. In a single
process that is everything and ``load_state_dict`` continues bit for bit.
Under DDP, AlgoPerf saves rank 0's state only; after such a resume the blocks
of other ranks restart their statistics (with a warning) and use the grafted
direction until their next root computation.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from absl import logging as absl_logging

from polyak.distributed_torch import rank_and_world
from polyak.optim.schedules import (
    constant_multiplier,
    warmup_cosine_multiplier,
    warmup_steps_for,
)
from polyak.optim.shampoo_blocking import (
    Block,
    ParameterPlan,
    assign_blocks,
    grafting_blocks,
    plan_parameter,
)
from polyak.optim.shampoo_config import (
    SKIPPED_WARNING_SECONDS,
    ShampooConfig,
    ShampooConfigError,
    counter_metrics,
)

__all__ = [
    "Shampoo",
    "make_shampoo",
    "training_metrics",
]

_LOG = logging.getLogger(__name__)

# Keeps the grafting ratio ‖a‖ / ‖p‖ finite when the Shampoo direction vanishes.
_NORM_FLOOR = 1e-16
# Graftings that keep a second moment of the gradient.
_SECOND_MOMENT_GRAFTINGS = ("adam", "rmsprop", "adagrad")


def warn_skipped_steps(total: int, now: int) -> None:
    """Logs that gradients were unusable and their updates skipped (at most once a minute)."""
    absl_logging.log_every_n_seconds(
        absl_logging.WARNING,
        "Shampoo: %d parameter(s) had a non-finite or overflowing gradient and were not "
        "updated this step (%d parameter-step(s) skipped so far)",
        SKIPPED_WARNING_SECONDS,
        now,
        total,
    )


class ShampooStateError(ValueError):
    """A gradient or a loaded state that this optimizer cannot work with."""


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo with Adam/SGD grafting (see the module docstring).

    Args:
        params: parameters or parameter groups. Groups may set ``lr`` and
            ``weight_decay``; everything else comes from ``config``.
        lr: learning rate (schedulers change ``param_groups[i]["lr"]``).
        config: the Shampoo settings; ``ShampooConfig()`` when None.
        process_group: the group to spread blocks over under
            ``torch.distributed``; the default group when None.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        config: ShampooConfig | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        config = ShampooConfig() if config is None else config
        if not isinstance(config, ShampooConfig):
            raise ShampooConfigError(f"config={config!r} must be a ShampooConfig")
        if not (isinstance(lr, float | int) and lr >= 0.0):
            raise ShampooConfigError(f"lr={lr!r} must be a number >= 0")
        self.config = config
        self._process_group = process_group
        self._rank, self._world_size = rank_and_world(process_group)
        super().__init__(params, {"lr": float(lr), "weight_decay": config.weight_decay})
        self._build_plan()

    # ------------------------------------------------------------------ planning

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_plans"):  # after construction: re-plan and re-balance
            self._build_plan()

    def _build_plan(self) -> None:
        params = self._all_params()
        self._plans: dict[torch.Tensor, ParameterPlan] = {
            p: plan_parameter(tuple(p.shape), self.config) for p in params
        }
        assignment = assign_blocks([self._plans[p] for p in params], self._world_size)
        self._owned: dict[torch.Tensor, tuple[int, ...]] = {p: () for p in params}
        for ref in assignment[self._rank]:
            p = params[ref.parameter]
            self._owned[p] = (*self._owned[p], ref.block)
        for p in params:
            if self.state.get(p):
                self._reconcile_blocks(p)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _factor_dtype(self, p: torch.Tensor) -> torch.dtype:
        """Statistics and eigh: float64 when so configured (or for float64 parameters)."""
        if self.config.preconditioner_precision == "float64" or p.dtype == torch.float64:
            return torch.float64
        return torch.float32

    def _root_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _new_block_state(self, p: torch.Tensor, block: Block) -> dict[str, Any]:
        factor_dtype, root_dtype = self._factor_dtype(p), self._root_dtype(p)
        return {
            "factors": [torch.zeros(d, d, dtype=factor_dtype, device=p.device) for d in block.dims],
            "roots": [torch.zeros(d, d, dtype=root_dtype, device=p.device) for d in block.dims],
            "root_ok": [False] * block.order,
            "root_failures": 0,
            "skipped_statistics": 0,
        }

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        config = self.config
        state["step"] = 0
        state["skipped_steps"] = 0
        state["direction_fallbacks"] = 0
        if config.beta1 > 0.0:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self._grafting_of(p) in _SECOND_MOMENT_GRAFTINGS:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if config.momentum > 0.0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        plan = self._plans[p]
        if plan.preconditioned:
            state["blocks"] = {b: self._new_block_state(p, plan.blocks[b]) for b in self._owned[p]}

    def _reconcile_blocks(self, p: torch.Tensor) -> int:
        """Keeps exactly this rank's blocks; returns how many had to start afresh."""
        plan = self._plans[p]
        state = self.state[p]
        if not plan.preconditioned:
            state.pop("blocks", None)
            return 0
        blocks = state.setdefault("blocks", {})
        for index in [b for b in blocks if b not in self._owned[p]]:
            del blocks[index]
        fresh = 0
        for index in self._owned[p]:
            block = plan.blocks[index]
            if index not in blocks:
                blocks[index] = self._new_block_state(p, block)
                fresh += 1
                continue
            shapes = [tuple(f.shape) for f in blocks[index]["factors"]]
            if shapes != [(d, d) for d in block.dims]:
                raise ShampooStateError(
                    f"loaded factors of block {index} of a parameter of shape {tuple(p.shape)} "
                    f"have shapes {shapes}; this optimizer expects blocks {block.dims} "
                    f"(max_preconditioner_dim={self.config.max_preconditioner_dim})"
                )
        return fresh

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise ShampooStateError(
                    f"a parameter of shape {tuple(p.shape)} has a sparse gradient; "
                    "Shampoo needs dense gradients"
                )
            self._init_state(p)
            params.append(p)
            grads.append(p.grad)
        params, grads, statistics_unsafe = self._screen_gradients(params, grads)
        if not params:
            return
        steps = []
        for p in params:
            self.state[p]["step"] += 1
            steps.append(self.state[p]["step"])

        self._update_preconditioners(params, grads, steps, statistics_unsafe)
        denominators = self._update_grafting(params, grads, steps)
        filtered = self._filtered_gradients(params, grads, steps)
        grafted = _divide(filtered, denominators)
        if self.config.use_normalized_grafting:
            graft_norm_source = _divide(self._block_normalized(params, grads), denominators)
        else:
            graft_norm_source = grafted
        directions = self._shampoo_directions(params, filtered, grafted, graft_norm_source, steps)

        weight_decay = group["weight_decay"]
        if weight_decay != 0.0:
            directions = list(torch._foreach_add(directions, params, alpha=weight_decay))
        momentum = self.config.momentum
        if momentum > 0.0:
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, directions, alpha=1.0 - momentum)
            if self.config.use_nesterov:
                directions = list(torch._foreach_mul(directions, 1.0 - momentum))
                torch._foreach_add_(directions, buffers, alpha=momentum)
            else:
                directions = buffers
        torch._foreach_add_(params, directions, alpha=-group["lr"])

    def _screen_gradients(
        self, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], set[tuple[torch.Tensor, int]]]:
        """Drops parameters with unusable gradients; finds blocks whose statistics would overflow.

        A gradient is usable when its norm is finite and below ``sqrt(max)/2``
        of its dtype: then every g² is finite and every new factor of an EMA
        (β2 < 1) stays below ``max/4``, because a factor's entries are bounded
        by its trace (it is PSD) and the trace is a convex mix of ‖G‖² values.
        Summed statistics (β2 = 1) can still grow past that bound; for them
        the predicted trace of each owned block is checked too. One host
        synchronisation covers everything.
        """
        if not params:
            return params, grads, set()
        norms = torch.stack([n.to(torch.float64) for n in torch._foreach_norm(grads)])
        limits = torch.tensor(
            [math.sqrt(torch.finfo(g.dtype).max) / 2 for g in grads],
            dtype=torch.float64,
            device=norms.device,
        )
        checks = [norms < limits]  # False for nan and inf too
        owned: list[tuple[int, int]] = []
        if self.config.beta2 == 1.0:
            traces = []
            for i, p in enumerate(params):
                for index in self._owned[p] if self._plans[p].preconditioned else ():
                    owned.append((i, index))
                    factor = self.state[p]["blocks"][index]["factors"][0]
                    traces.append(factor.diagonal().sum().to(torch.float64))
            if traces:
                factor_limit = torch.finfo(torch.float32).max / 4
                positions = torch.tensor([i for i, _ in owned], device=norms.device)
                checks.append(torch.stack(traces) + norms[positions] ** 2 < factor_limit)
        flags = torch.cat(checks).tolist()
        usable, safe = flags[: len(params)], flags[len(params) :]
        unsafe = {(params[i], index) for (i, index), ok in zip(owned, safe, strict=True) if not ok}
        if all(usable):
            return params, grads, unsafe
        kept_params, kept_grads = [], []
        for p, g, ok in zip(params, grads, usable, strict=True):
            if ok:
                kept_params.append(p)
                kept_grads.append(g)
            else:
                self.state[p]["skipped_steps"] += 1
        warn_skipped_steps(
            sum(self.state[p].get("skipped_steps", 0) for p in self._all_params()),
            len(params) - len(kept_params),
        )
        return kept_params, kept_grads, unsafe

    def _filtered_gradients(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], steps: list[int]
    ) -> list[torch.Tensor]:
        """m̃ for each parameter; read-only (it may alias a gradient or a state)."""
        beta1 = self.config.beta1
        if beta1 == 0.0:
            return grads
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        filtered = exp_avgs
        if self.config.use_nadam:
            filtered = list(torch._foreach_mul(exp_avgs, beta1))
            torch._foreach_add_(filtered, grads, alpha=1.0 - beta1)
        if self.config.use_bias_correction:
            filtered = list(torch._foreach_div(filtered, [1.0 - beta1**t for t in steps]))
        return filtered

    def _grafting_of(self, p: torch.Tensor) -> str:
        """Large (grafted-only) parameters always get Adam grafting, as in the v0.5 submission."""
        if any(d >= self.config.preconditioning_dim_limit for d in p.shape):
            return "adam"
        return self.config.grafting

    def _update_grafting(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], steps: list[int]
    ) -> list[torch.Tensor | None]:
        """Updates the grafted method's second moments; returns each parameter's denominator.

        ``None`` for SGD (and no) grafting, whose direction is the filtered
        gradient itself. Adam: √(v/(1−β2ᵗ)) + ε; RMSprop: √v + ε (EMA, no
        correction); AdaGrad: √(Σg²) + ε.
        """
        config = self.config
        sources = self._block_normalized(params, grads) if config.use_normalized_grafting else grads
        denominators: list[torch.Tensor | None] = [None] * len(params)
        for kind in _SECOND_MOMENT_GRAFTINGS:
            members = [i for i, p in enumerate(params) if self._grafting_of(p) == kind]
            if not members:
                continue
            beta2 = 1.0 if kind == "adagrad" else config.grafting_beta2
            exp_avg_sqs = [self.state[params[i]]["exp_avg_sq"] for i in members]
            chosen = [sources[i] for i in members]
            if beta2 == 1.0:
                torch._foreach_addcmul_(exp_avg_sqs, chosen, chosen, value=1.0)
            else:
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, chosen, chosen, value=1.0 - beta2)
            if kind == "adam" and config.use_bias_correction and beta2 < 1.0:
                corrected = torch._foreach_div(
                    exp_avg_sqs, [1.0 - beta2 ** steps[i] for i in members]
                )
            else:
                corrected = [v.clone() for v in exp_avg_sqs]
            torch._foreach_sqrt_(corrected)
            torch._foreach_add_(corrected, config.grafting_epsilon)
            for i, denominator in zip(members, corrected, strict=True):
                denominators[i] = denominator
        return denominators

    def _block_normalized(
        self, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each block of each gradient divided by its norm (normalized grafting's input)."""
        result = []
        for p, grad in zip(params, grads, strict=True):
            merged_shape, blocks = grafting_blocks(tuple(p.shape), self.config)
            normalized = torch.empty_like(grad).view(merged_shape)
            source = grad.reshape(merged_shape)
            for block in blocks:
                piece = source[block]
                normalized[block] = piece / (torch.linalg.vector_norm(piece) + _NORM_FLOOR)
            result.append(normalized.view(p.shape))
        return result

    def _preconditioning_starts(self) -> int:
        return max(self.config.start_preconditioning_step, 1)

    def _roots_due(self, step: int) -> bool:
        start = self._preconditioning_starts()
        frequency = self.config.precondition_frequency
        return step == start or (step > start and step % frequency == 0)

    def _update_preconditioners(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        steps: list[int],
        statistics_unsafe: set[tuple[torch.Tensor, int]],
    ) -> None:
        """Statistics of this rank's blocks every step; their roots when due."""
        beta2 = self.config.beta2
        for p, grad, step in zip(params, grads, steps, strict=True):
            plan = self._plans[p]
            if not plan.preconditioned:
                continue
            grad = grad.reshape(plan.merged_shape)
            roots_due = self._roots_due(step)
            for index in self._owned[p]:
                block = plan.blocks[index]
                block_state = self.state[p]["blocks"][index]
                if (p, index) in statistics_unsafe:
                    block_state["skipped_statistics"] += 1
                else:
                    _accumulate_statistics(
                        block_state["factors"], grad[block.slices].to(self._factor_dtype(p)), beta2
                    )
                if roots_due:
                    self._update_roots(block_state, block, step)

    def _update_roots(self, block_state: dict[str, Any], block: Block, step: int) -> None:
        config = self.config
        correction = 1.0
        if config.use_bias_correction and config.beta2 < 1.0:
            correction = 1.0 - config.beta2**step
        root = config.inv_root_override or 2 * block.order
        exponent = -config.exponent_multiplier / root
        for j, factor in enumerate(block_state["factors"]):
            inverse_root = _inverse_root(
                factor / correction, exponent, config.epsilon, config.max_root_condition
            )
            if inverse_root is None:
                block_state["root_failures"] += 1
                continue
            block_state["roots"][j].copy_(inverse_root)
            block_state["root_ok"][j] = True

    def _shampoo_directions(
        self,
        params: list[torch.Tensor],
        filtered: list[torch.Tensor],
        grafted: list[torch.Tensor],
        graft_norm_source: list[torch.Tensor],
        steps: list[int],
    ) -> list[torch.Tensor]:
        """Per-block Shampoo directions grafted to the grafted method's block norms.

        This rank's blocks are written into one flat buffer (zeros elsewhere
        under DDP) that an all_reduce completes. Parameters that are grafted
        only, or not yet preconditioning, keep the grafted direction.
        """
        start = self._preconditioning_starts()
        active = [
            i for i, p in enumerate(params) if self._plans[p].preconditioned and steps[i] >= start
        ]
        if not active:
            return grafted
        device = params[active[0]].device
        buffer_dtype = functools.reduce(
            torch.promote_types, (params[i].dtype for i in active), torch.float32
        )
        sizes = [params[i].numel() for i in active]
        total = sum(sizes)
        # A single process owns every block, and the blocks tile each parameter.
        if self._world_size > 1:
            buffer = torch.zeros(total, dtype=buffer_dtype, device=device)
        else:
            buffer = torch.empty(total, dtype=buffer_dtype, device=device)
        segments = torch.split(buffer, sizes)

        targets: list[torch.Tensor] = []
        preconditioned: list[torch.Tensor] = []
        graft_blocks: list[torch.Tensor] = []
        for i, segment in zip(active, segments, strict=True):
            p = params[i]
            plan = self._plans[p]
            dtype = self._root_dtype(p)
            view = segment.view(plan.merged_shape)
            momentum = filtered[i].reshape(plan.merged_shape)
            graft = grafted[i].reshape(plan.merged_shape)
            graft_source = graft_norm_source[i].reshape(plan.merged_shape)
            for index in self._owned[p]:
                block = plan.blocks[index]
                block_state = self.state[p]["blocks"][index]
                if all(block_state["root_ok"]):
                    targets.append(view[block.slices])
                    preconditioned.append(
                        _precondition(momentum[block.slices].to(dtype), block_state["roots"])
                    )
                    graft_blocks.append(graft_source[block.slices])
                else:  # no good root yet: the grafted direction alone
                    view[block.slices] = graft[block.slices]
        if preconditioned and self.config.grafting != "none":
            norms = torch._foreach_norm(preconditioned + graft_blocks)
            count = len(preconditioned)
            shampoo_norms, graft_norms = norms[:count], norms[count:]
            torch._foreach_add_(shampoo_norms, _NORM_FLOOR)
            scales = torch._foreach_div(graft_norms, shampoo_norms)
            torch._foreach_mul_(
                preconditioned, [s.to(d.dtype) for s, d in zip(scales, preconditioned, strict=True)]
            )
        for target, direction in zip(targets, preconditioned, strict=True):
            target.copy_(direction)
        if self._world_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self._process_group)
        # An overflow in some block's direction (conceivable only with extreme
        # roots or gradients) would poison the parameters: fall back to the
        # grafted directions for this step. Identical on every rank.
        if not bool(torch.isfinite(buffer.sum())):
            for i in active:
                self.state[params[i]]["direction_fallbacks"] += 1
            return grafted
        directions = list(grafted)
        for i, segment in zip(active, segments, strict=True):
            directions[i] = segment.view(params[i].shape).to(params[i].dtype)
        return directions

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["shampoo"] = {"world_size": self._world_size, "rank": self._rank}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A private copy: the base class would otherwise share tensors with the
        # caller's dict, and it casts every tensor to the parameter's dtype,
        # which would turn float32 factors of bf16 parameters (and our integer
        # counters) lossy; those dtypes are restored from the copy below.
        saved = copy.deepcopy(state_dict)
        super().load_state_dict(saved)
        fresh = 0
        for index, p in enumerate(self._all_params()):
            if index in saved["state"]:
                self.state[p] = _restore_dtypes(self.state[p], saved["state"][index], p.device)
                fresh += self._reconcile_blocks(p)
        if fresh:
            _LOG.warning(
                "Shampoo: %d preconditioner block(s) of rank %d were not in the loaded state "
                "(saved by rank %s of %s); their statistics restart from zero",
                fresh,
                self._rank,
                state_dict.get("shampoo", {}).get("rank", "?"),
                state_dict.get("shampoo", {}).get("world_size", "?"),
            )

    def metrics(self) -> dict[str, float]:
        """Counters for the training log (``shampoo/…``), as the averager reports its skips."""
        return counter_metrics(self.diagnostics())

    def diagnostics(self) -> dict[str, int]:
        """Counters of this rank (root failures, skipped statistics and steps, memory)."""
        counters = {
            "root_failures": 0,
            "skipped_statistics": 0,
            "skipped_steps": 0,
            "direction_fallbacks": 0,
            "preconditioned_blocks": 0,
            "factor_elements": 0,
        }
        for state in self.state.values():
            counters["skipped_steps"] += state.get("skipped_steps", 0)
            counters["direction_fallbacks"] += state.get("direction_fallbacks", 0)
            for block_state in state.get("blocks", {}).values():
                counters["preconditioned_blocks"] += 1
                counters["root_failures"] += block_state["root_failures"]
                counters["skipped_statistics"] += block_state["skipped_statistics"]
                counters["factor_elements"] += sum(
                    f.numel() for f in block_state["factors"] + block_state["roots"]
                )
        return counters


# ---------------------------------------------------------------------- math


def _accumulate_statistics(factors: list[torch.Tensor], block: torch.Tensor, beta2: float) -> None:
    """Lᵢ ← β2·Lᵢ + (1−β2)·G₍ᵢ₎G₍ᵢ₎ᵀ in place (Lᵢ ← Lᵢ + G₍ᵢ₎G₍ᵢ₎ᵀ when β2 = 1).

    Scale, then add the contraction over every other mode: Distributed
    Shampoo's order of operations, so float32 factors round alike.
    """
    modes = list(range(block.dim()))
    if beta2 != 1.0:
        torch._foreach_mul_(factors, beta2)
    products = [
        torch.tensordot(block, block, dims=([d for d in modes if d != i],) * 2)
        for i in range(block.dim())
    ]
    torch._foreach_add_(factors, products, alpha=1.0 - beta2 if beta2 != 1.0 else 1.0)


def _inverse_root(
    matrix: torch.Tensor, exponent: float, epsilon: float, max_condition: float
) -> torch.Tensor | None:
    """``(matrix + shift·I + ε'·I)^exponent`` of a symmetric PSD matrix, or None on failure.

    As in Distributed Shampoo, a negative smallest eigenvalue (round-off)
    shifts the whole spectrum up to 0 first. ``ε' = max(ε, λmax·c^(1/exponent))``
    caps the root's condition number at ``c = max_condition`` (0: ``ε' = ε``).
    A float32 matrix is retried in float64 if its eigh fails.
    """
    dtypes = [torch.float64] if matrix.dtype == torch.float64 else [matrix.dtype, torch.float64]
    for dtype in dtypes:
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(matrix.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError and friends
            continue
        eigenvalues = eigenvalues - eigenvalues.min().clamp(max=0.0)
        floor = epsilon
        if max_condition > 0:
            floor = max(epsilon, float(eigenvalues.max()) * max_condition ** (1.0 / exponent))
        scales = eigenvalues.add(floor).pow(exponent)
        result = eigenvectors * scales.unsqueeze(0) @ eigenvectors.T
        if bool(torch.isfinite(result).all()):
            return result
    return None


def _precondition(block: torch.Tensor, roots: Sequence[torch.Tensor]) -> torch.Tensor:
    """``block ×₁ Q₁ ×₂ … ×ₖ Qₖ`` with symmetric Qᵢ (each contraction moves the next mode first)."""
    result = block
    for root in roots:
        result = torch.tensordot(result, root, dims=([0], [0]))
    return result


def _divide(
    numerators: list[torch.Tensor], denominators: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    return [n if d is None else n / d for n, d in zip(numerators, denominators, strict=True)]


def _restore_dtypes(loaded: Any, saved: Any, device: torch.device) -> Any:
    if isinstance(loaded, torch.Tensor):
        return loaded if loaded.dtype == saved.dtype else saved.to(device)
    if isinstance(loaded, dict):
        return {k: _restore_dtypes(v, saved[k], device) for k, v in loaded.items()}
    if isinstance(loaded, list):
        return [_restore_dtypes(v, s, device) for v, s in zip(loaded, saved, strict=True)]
    return loaded


# ---------------------------------------------------------------------- factory


def make_shampoo(
    params: Iterable[torch.Tensor], config: ShampooConfig, step_hint: int
) -> tuple[Shampoo, torch.optim.lr_scheduler.LRScheduler]:
    """Shampoo and its warmup + cosine schedule.

    The schedule's horizon is ``step_hint_factor · step_hint`` (as in the v0.5
    submission); with ``use_cosine_decay`` False the rate stays at its peak
    after warmup. Call ``optimizer.step()`` then ``scheduler.step()`` once per
    training step.
    """
    optimizer = Shampoo(params, lr=config.learning_rate, config=config)
    horizon = max(1, int(config.step_hint_factor * step_hint))
    warmup_steps = warmup_steps_for(config.warmup_factor, horizon)
    multiplier = warmup_cosine_multiplier if config.use_cosine_decay else constant_multiplier
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(_schedule, multiplier, warmup_steps=warmup_steps, step_hint=horizon),
    )
    return optimizer, scheduler


def _schedule(
    multiplier: Callable[[int, int, int], float], count: int, *, warmup_steps: int, step_hint: int
) -> float:
    return multiplier(count, warmup_steps, step_hint)


def training_metrics(optimizer: Shampoo) -> dict[str, float]:
    """The twin of ``shampoo_jax.training_metrics``: the counters for the training log."""
    return optimizer.metrics()
