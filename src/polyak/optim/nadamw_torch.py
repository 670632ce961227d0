"""NAdamW for PyTorch: AlgoPerf's NAdamW baseline as a ``torch.optim.Optimizer``.

The math is the simple NAdam of Table 1 in arXiv:1910.05446 (Choi et al.) with
decoupled weight decay, as AlgoPerf's baselines compute it. Per step t (1-based)::

    θ ← θ·(1 − lr·wd)                       weight decay first, as AlgoPerf's torch baseline
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²
    m̂ = (β1·m + (1 − β1)·g) / (1 − β1ᵗ)     the Nesterov look-ahead
    v̂ = v / (1 − β2ᵗ)
    θ ← θ − lr·m̂ / (√v̂ + ε)

This is not ``torch.optim.NAdam`` (momentum decay schedule) nor ``optax.nadamw``
(which bias-corrects the look-ahead differently).

Layout follows ``torch/optim/adamw.py``: :class:`NAdamW` only gathers state, and
:func:`nadamw` hands it to :func:`_single_tensor_nadamw`, :func:`_multi_tensor_nadamw`
(``torch._foreach_*``, grouped by device and dtype) or the fused path, a
``torch.compile``-d one-pass kernel that lives in
:mod:`polyak.optim.nadamw_torch_compiled`. By default a run takes foreach steps until
they have cost as much as the compile would, then compiles (that module says why), so
no process pays for a compile at its first step.

:func:`make_nadamw` builds the optimizer and AlgoPerf's warmup + cosine schedule from a
:class:`~polyak.optim.nadamw_config.NadamWConfig`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from polyak.optim.nadamw_config import EPSILON, NadamWConfig
from polyak.optim.schedules import warmup_cosine_multiplier, warmup_steps_for

if TYPE_CHECKING:
    from polyak.optim.nadamw_torch_compiled import FlatCache

__all__ = [
    "EPSILON",
    "NAdamW",
    "NAdamWHyperparameterError",
    "make_nadamw",
    "nadamw",
]


class NAdamWHyperparameterError(ValueError):
    """A NAdamW hyperparameter lies outside its valid range."""


def _check_hyperparameters(
    lr: Any, betas: Any, eps: Any, weight_decay: Any, *, where: str = "NAdamW"
) -> None:
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise NAdamWHyperparameterError(f"{where}: lr={lr!r} must be a number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise NAdamWHyperparameterError(f"{where}: betas={betas!r} must be a pair (beta1, beta2)")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor) or not isinstance(beta, (int, float)):
            raise NAdamWHyperparameterError(
                f"{where}: betas[{index}]={beta!r} must be a number in [0, 1)"
            )
        if not 0.0 <= beta < 1.0:
            raise NAdamWHyperparameterError(f"{where}: betas[{index}]={beta!r} must lie in [0, 1)")
    if isinstance(eps, Tensor) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise NAdamWHyperparameterError(f"{where}: eps={eps!r} must be a number >= 0")
    if (
        isinstance(weight_decay, Tensor)
        or not isinstance(weight_decay, (int, float))
        or not weight_decay >= 0.0
    ):
        raise NAdamWHyperparameterError(
            f"{where}: weight_decay={weight_decay!r} must be a number >= 0"
        )


class NAdamW(torch.optim.Optimizer):
    """AlgoPerf's NAdamW (see the module docstring for the update).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: peak learning rate; a scheduler rescales ``group["lr"]``.
        betas: (β1, β2), each in [0, 1).
        eps: added to √v̂.
        weight_decay: decoupled, multiplied by the current ``lr``.
        foreach: use ``torch._foreach_*`` kernels (default when not fused).
        fused: use the ``torch.compile``-d one-pass kernel from the first step
            (``True``), never (``False``), or, with ``None`` (default) and ``foreach``
            not given, once the steps taken would have paid for the compile, where
            inductor runs (CPU, CUDA, XPU) and ``torch.compile`` is not disabled
            (:mod:`polyak.optim.nadamw_torch_compiled` explains the rule). ``True``
            warns once where it cannot be used. A kernel that fails to compile or to
            match the reference falls back to foreach with one warning.

    State per parameter: ``step`` (a float32 scalar tensor on CPU, exact up to 2**24
    steps; every path reads it on the host, so a GPU step never waits for the device),
    ``exp_avg`` (m) and ``exp_avg_sq`` (v), laid out like the parameter.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = EPSILON,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if fused and foreach:
            raise ValueError("NAdamW: fused=True and foreach=True are mutually exclusive")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "fused": fused,
        }
        # Not state: flat views the compiled kernel reuses between steps.
        self._flat_cache: FlatCache = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        if merged.get("fused") and merged.get("foreach"):
            raise ValueError("NAdamW: fused=True and foreach=True are mutually exclusive")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._flat_cache = {}
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(
                    f"NAdamW does not support sparse gradients (parameter of shape "
                    f"{tuple(param.shape)})"
                )
            if torch.is_complex(param):
                raise ValueError(f"NAdamW does not support complex parameters (got {param.dtype})")
            state = self.state[param]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            nadamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                foreach=group["foreach"],
                fused=group["fused"],
                beta1=beta1,
                beta2=beta2,
                lr=float(group["lr"]),
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                flat_cache=self._flat_cache,
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim hands back the caller's own tensors where no cast is needed, so a
        # later step would mutate the saved dict (and a second optimizer loaded from it).
        incoming = {
            id(value)
            for param_state in state_dict["state"].values()
            for value in param_state.values()
            if isinstance(value, Tensor)
        }
        super().load_state_dict(state_dict)
        self._flat_cache.clear()  # it would keep the replaced moments alive
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                for key, value in list(state.items()):
                    if isinstance(value, Tensor) and id(value) in incoming:
                        state[key] = value.clone()
                if "step" in state:
                    # torch.optim moves the step of a group flagged "fused" to the device.
                    state["step"] = state["step"].to(dtype=torch.float32, device="cpu")


def nadamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    flat_cache: FlatCache | None = None,
) -> None:
    """Functional NAdamW: updates ``params``, the moments and the step counts in place.

    ``state_steps`` are float32 scalar tensors on CPU. ``fused`` and ``foreach`` choose
    the path as in :class:`NAdamW`. ``flat_cache`` (fused path only) lets a caller keep
    the kernel's flat views of params and moments between steps.
    """
    if not all(isinstance(step, Tensor) for step in state_steps):
        raise TypeError("NAdamW: state_steps must be scalar tensors")
    lists = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps))
    hyper = {"beta1": beta1, "beta2": beta2, "lr": lr, "weight_decay": weight_decay, "eps": eps}
    if fused or (fused is None and foreach is None):
        # Imported on first use: the compiled path builds on this module's foreach path.
        from polyak.optim.nadamw_torch_compiled import fused_nadamw

        fused_nadamw(*lists, **hyper, flat_cache=flat_cache, requested=bool(fused))
    elif foreach is None or foreach:
        _multi_tensor_nadamw(*lists, **hyper)
    else:
        _single_tensor_nadamw(*lists, **hyper)


def _single_tensor_nadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps
    ):
        step_t += 1
        step = step_t.item()
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)

        param.mul_(1.0 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        nesterov = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        param.addcdiv_(nesterov, denom, value=-lr / bias_correction1)


def _multi_tensor_nadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    grouped = _group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for (
        device_params,
        device_grads,
        device_exp_avgs,
        device_exp_avg_sqs,
        device_steps,
    ) in grouped.values():
        torch._foreach_add_(device_steps, 1.0)
        counts = [step_t.item() for step_t in device_steps]
        bias_corrections2_sqrt = [math.sqrt(1.0 - beta2**count) for count in counts]
        step_sizes = [-lr / (1.0 - beta1**count) for count in counts]

        torch._foreach_mul_(device_params, 1.0 - lr * weight_decay)
        torch._foreach_mul_(device_exp_avgs, beta1)
        torch._foreach_add_(device_exp_avgs, device_grads, alpha=1.0 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, value=1.0 - beta2)
        nesterov = torch._foreach_mul(device_exp_avgs, beta1)
        torch._foreach_add_(nesterov, device_grads, alpha=1.0 - beta1)
        denom = torch._foreach_sqrt(device_exp_avg_sqs)
        torch._foreach_div_(denom, bias_corrections2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(device_params, nesterov, denom, step_sizes)


def _group_by_device_and_dtype(
    *tensor_lists: list[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Splits parallel lists by the (device, dtype) of the first list, keeping order."""
    keys = {(param.device, param.dtype) for param in tensor_lists[0]}
    if len(keys) == 1:  # the common case, without a Python loop over every tensor
        return {keys.pop(): [list(tensors) for tensors in tensor_lists]}
    groups: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for index, param in enumerate(tensor_lists[0]):
        lists = groups.setdefault((param.device, param.dtype), [[] for _ in tensor_lists])
        for target, source in zip(lists, tensor_lists):
            target.append(source[index])
    return groups


# ---------------------------------------------------------------------------------------
# Factory used by the AlgoPerf builder.


def make_nadamw(
    params: Iterable[Tensor], config: NadamWConfig, step_hint: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """NAdamW plus AlgoPerf's warmup + cosine schedule (held at 0 past ``step_hint``).

    Call ``optimizer.step()`` then ``scheduler.step()`` once per training step.
    """
    warmup_steps = warmup_steps_for(config.warmup_factor, step_hint)
    optimizer = NAdamW(
        params,
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        eps=config.epsilon,
        weight_decay=config.weight_decay,
    )
    multiplier = functools.partial(
        warmup_cosine_multiplier, warmup_steps=warmup_steps, step_hint=step_hint
    )
    scheduler = LambdaLR(optimizer, lr_lambda=multiplier)
    return optimizer, scheduler
