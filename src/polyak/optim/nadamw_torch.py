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

Layout follows ``torch.optim``: :class:`NAdamW` only gathers state; the math lives in
:func:`_single_tensor_nadamw`, :func:`_multi_tensor_nadamw` (``torch._foreach_*``,
grouped by device and dtype) and :func:`_fused_nadamw`. The fused path runs the whole
update in one pass over memory per tensor, through a ``torch.compile``-d kernel:
foreach needs about a dozen passes, and on CPU the update is bound by memory bandwidth.
It takes flat 1-D aliases of up to ``COMPILED_BUCKET_SIZE`` tensors per call, so one
graph with dynamic sizes serves any model. It is compiled once per (device type, dtype)
on first use (seconds to tens of seconds, depending on the machine and on inductor's
on-disk cache), checked against a float64 reference on a tiny problem, and replaced by
the foreach path with a single warning if either step fails.

:func:`make_nadamw` builds the optimizer and AlgoPerf's warmup + cosine schedule from a
:class:`~polyak.optim.nadamw_config.NadamWConfig`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from polyak.optim.nadamw_config import EPSILON, NadamWConfig
from polyak.optim.schedules import warmup_cosine_multiplier, warmup_steps_for

__all__ = [
    "EPSILON",
    "NAdamW",
    "NAdamWHyperparameterError",
    "make_nadamw",
    "nadamw",
]

# Tensors per call of the compiled kernel. A call costs tens of microseconds of Python
# and guard overhead, while compile time grows with the tensors one graph holds. With
# 16, a 120-tensor model takes 8 calls a step and compiles about as fast as with 8.
COMPILED_BUCKET_SIZE = 16

# A CPU bucket with fewer elements in all runs on one thread. The compiled kernel ends
# each of its loops (padding included) with a thread barrier, so a bucket needs the
# work of a full bucket of tensors at ATen's grain size (at::internal::GRAIN_SIZE,
# 32768) to pay for them.
_PARALLEL_MIN_BUCKET_NUMEL = COMPILED_BUCKET_SIZE * 32768

# Device types on which ``fused=None`` tries the compiled kernel (inductor backends).
_COMPILE_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu"})


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
        fused: use the ``torch.compile``-d one-pass kernel. ``None`` (default) uses it
            unless ``foreach`` is given, where inductor runs (CPU, CUDA, XPU) and
            ``torch.compile`` is not disabled, and quietly uses foreach elsewhere.
            ``True`` warns once where it cannot be used. A kernel that fails to compile
            or to match the reference falls back to foreach with one warning.

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
        self._flat_cache: dict[int, _FlatEntry] = {}
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
    flat_cache: dict[int, _FlatEntry] | None = None,
) -> None:
    """Functional NAdamW: updates ``params``, the moments and the step counts in place.

    ``state_steps`` are float32 scalar tensors on CPU. ``flat_cache`` (fused path only)
    lets a caller keep the kernel's flat views of params and moments between steps.
    """
    if not all(isinstance(step, Tensor) for step in state_steps):
        raise TypeError("NAdamW: state_steps must be scalar tensors")
    lists = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps))
    hyper = {"beta1": beta1, "beta2": beta2, "lr": lr, "weight_decay": weight_decay, "eps": eps}
    if fused or (fused is None and foreach is None):
        _fused_nadamw(*lists, **hyper, flat_cache=flat_cache, requested=bool(fused))
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
# Fused path: one torch.compile-d pass over memory per tensor.


def _nadamw_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    coefficients: Tensor,
) -> None:
    """The update for flat tensors; ``coefficients[i]`` holds tensor i's scalars.

    The scalars arrive as a tensor, not as Python numbers, so that a new step or
    learning rate does not recompile, and they are computed outside the kernel so
    that no ``pow`` runs per element. With s = √(1 − β2ᵗ), the update
    lr/(1 − β1ᵗ) · n/(√v/s + ε) is computed as (lr·s/(1 − β1ᵗ)) · n/(√v + ε·s):
    the same number, one division fewer per element.
    """
    for index in range(len(params)):
        param, grad = params[index], grads[index]
        exp_avg, exp_avg_sq = exp_avgs[index], exp_avg_sqs[index]
        (
            decay,
            scaled_step_size,
            scaled_eps,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
        ) = coefficients[index].unbind(0)
        new_exp_avg = exp_avg * beta1 + grad * one_minus_beta1
        new_exp_avg_sq = exp_avg_sq * beta2 + grad * grad * one_minus_beta2
        nesterov = new_exp_avg * beta1 + grad * one_minus_beta1
        exp_avg.copy_(new_exp_avg)
        exp_avg_sq.copy_(new_exp_avg_sq)
        param.copy_(
            param * decay - scaled_step_size * (nesterov / (new_exp_avg_sq.sqrt() + scaled_eps))
        )


# (device type, dtype) -> None when the compiled kernel works there, else the reason.
_KERNEL_STATUS: dict[tuple[str, torch.dtype], str | None] = {}
_PADDING: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
_WARNED: set[str] = set()


@functools.lru_cache(maxsize=1)
def _compiled_kernel() -> Callable[..., None]:
    # dynamic=True: one graph serves every tensor size, so a model compiles once.
    options: dict[str, Any] = {}
    from torch._inductor import config as inductor_config

    cpp_config = getattr(inductor_config, "cpp", None)
    if hasattr(cpp_config, "dynamic_threads"):
        # Inductor picks serial CPU loops when the sizes it compiles for (the tiny
        # self-check's) look small; this keeps every loop parallel, with the thread
        # count read at run time.
        options["cpp.dynamic_threads"] = True
    if hasattr(inductor_config, "size_asserts"):
        # The inputs are flat views we build ourselves; checking 64 of them costs more
        # per call than the kernel on small tensors.
        options["size_asserts"] = False
    contract_flag = getattr(cpp_config, "enable_floating_point_contract_flag", None)
    if contract_flag is not None:
        # Fused multiply-adds: fewer instructions per element, and no less accurate.
        # (A bool in some torch releases, the -ffp-contract value in others.)
        options["cpp.enable_floating_point_contract_flag"] = (
            True if isinstance(contract_flag, bool) else "fast"
        )
    return torch.compile(_nadamw_kernel, fullgraph=True, dynamic=True, options=options)


def _compile_config() -> contextlib.AbstractContextManager[Any]:
    # Duck shaping would tie equal sizes within a bucket to one symbol and recompile
    # whenever the next bucket's pattern of equal sizes differs. Scoped to our calls.
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _coefficient_rows(
    counts: Sequence[float],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> list[list[float]]:
    """The kernel's scalars per tensor (see :func:`_nadamw_kernel`), in float64."""
    decay = 1.0 - lr * weight_decay
    by_count: dict[float, list[float]] = {}  # tensors of a group usually share one count
    for count in counts:
        if count not in by_count:
            bias_correction2_sqrt = math.sqrt(1.0 - beta2**count)
            by_count[count] = [
                decay,
                lr * bias_correction2_sqrt / (1.0 - beta1**count),
                eps * bias_correction2_sqrt,
                beta1,
                1.0 - beta1,
                beta2,
                1.0 - beta2,
            ]
    return [by_count[count] for count in counts]


class _FlatEntry(NamedTuple):
    """1-D aliases of one parameter and its moments, valid while the tensors are unchanged.

    ``detach`` drops each view's link to its base, so the compiled graph sees plain 1-D
    inputs and does not guard on (and recompile for) the bases' shapes.
    """

    param_pointer: int
    exp_avg: Tensor
    exp_avg_sq: Tensor
    order: tuple[int, ...] | None  # dims ordered so the layout is contiguous; None: as is
    stride: tuple[int, ...]
    param_flat: Tensor
    exp_avg_flat: Tensor
    exp_avg_sq_flat: Tensor

    def is_current(self, param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
        # The cached alias keeps the old memory alive, so a swapped ``param.data`` can
        # never reuse the old address.
        return (
            self.param_pointer == param.data_ptr()
            and self.stride == param.stride()
            and self.param_flat.numel() == param.numel()
            and self.exp_avg is exp_avg
            and self.exp_avg_sq is exp_avg_sq
        )

    def flatten(self, tensor: Tensor) -> Tensor:
        source = tensor if self.order is None else tensor.permute(self.order)
        return source.view(-1).detach()


def _flat_entry(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> _FlatEntry | None:
    """The aliases, or None for tensors the kernel does not take (they use foreach)."""
    # Size 0/1 would be specialised by the compiler (one more graph); such tensors are
    # too small to matter for speed.
    if param.numel() < 2:
        return None
    stride = param.stride()
    if any(t.dtype != param.dtype or t.stride() != stride for t in (exp_avg, exp_avg_sq)):
        return None
    order: tuple[int, ...] | None = None
    if not param.is_contiguous():
        # A dense layout in another dim order (channels_last, say) is one block in memory.
        order = tuple(sorted(range(param.dim()), key=param.stride, reverse=True))
        if not param.permute(order).is_contiguous():
            return None
    entry = _FlatEntry(param.data_ptr(), exp_avg, exp_avg_sq, order, stride, param, param, param)
    return entry._replace(
        param_flat=entry.flatten(param),
        exp_avg_flat=entry.flatten(exp_avg),
        exp_avg_sq_flat=entry.flatten(exp_avg_sq),
    )


def _padding(device: torch.device, dtype: torch.dtype) -> list[list[Tensor]]:
    """Distinct throwaway tensors that fill the last bucket to the compiled length."""
    key = (device, dtype)
    if key not in _PADDING:
        _PADDING[key] = [
            [torch.zeros(2, device=device, dtype=dtype) for _ in range(COMPILED_BUCKET_SIZE)]
            for _ in range(4)
        ]
    return _PADDING[key]


def _run_compiled_buckets(
    flat: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    allow_serial: bool = True,
) -> tuple[int, Exception | None]:
    """Updates ``flat`` bucket by bucket: (how many tensors it updated, the failure).

    Step counts advance only for updated tensors, so a failure part-way leaves the
    rest untouched for the foreach fallback.
    """
    device, dtype = flat[0][0].device, flat[0][0].dtype
    size = COMPILED_BUCKET_SIZE
    # Step counts live on CPU, so the scalars cost no device work; a padding slot reuses
    # the first row (any finite values do).
    rows = _coefficient_rows(
        [step.item() + 1.0 for step in steps],
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
    )
    # The kernel computes in float32 for float32 and narrower params, so float32 scalars
    # lose nothing there and are cheaper to load.
    coefficient_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    padding = _padding(device, dtype)
    updated = 0
    failure: Exception | None = None
    try:
        kernel = _compiled_kernel()
        # Grad mode is part of what a compiled graph is guarded on: fix it, so that the
        # self-check and a functional call with grad enabled share the optimizer's graph.
        with torch.no_grad(), _compile_config():
            for start in range(0, len(flat), size):
                bucket = flat[start : start + size]
                bucket_rows = rows[start : start + size]
                missing = size - len(bucket)
                lists = [[aliases[role] for aliases in bucket] for role in range(4)]
                if missing:
                    lists = [lst + padding[role][:missing] for role, lst in enumerate(lists)]
                    bucket_rows = bucket_rows + [rows[0]] * missing
                coefficients = torch.tensor(bucket_rows, dtype=coefficient_dtype).to(
                    device, non_blocking=True
                )
                serial = (
                    allow_serial
                    and device.type == "cpu"
                    and sum(aliases[0].numel() for aliases in bucket) < _PARALLEL_MIN_BUCKET_NUMEL
                )
                with _single_thread() if serial else contextlib.nullcontext():
                    kernel(*lists, coefficients)
                updated += len(bucket)
    except Exception as error:  # compile failures surface as many exception types
        failure = error
    if updated:
        torch._foreach_add_(steps[:updated], 1.0)
    return updated, failure


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # The compiled CPU kernel opens an OpenMP region whatever the sizes (inductor has no
    # run-time cut-off), and each of its loops ends in a barrier: microseconds on an
    # idle machine, milliseconds on an oversubscribed one. Small buckets skip threads.
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _describe(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _check_compiled_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Compiles the kernel for (device, dtype) and checks one step against float64."""
    generator = torch.Generator().manual_seed(0)
    sizes = [2 + 3 * index for index in range(COMPILED_BUCKET_SIZE - 1)]
    hyper = {"beta1": 0.9, "beta2": 0.99, "lr": 0.1, "weight_decay": 0.1, "eps": 1e-3}

    def random_list(scale: float, positive: bool = False) -> list[Tensor]:
        values = [torch.randn(n, generator=generator, dtype=torch.float64) for n in sizes]
        return [scale * (v.abs() if positive else v) for v in values]

    state64 = [random_list(1.0), random_list(1.0), random_list(0.1), random_list(0.1, True)]
    steps64 = [torch.full((), float(2 + index), dtype=torch.float32) for index in range(len(sizes))]
    steps = [s.clone() for s in steps64]
    tensors = [[t.to(device=device, dtype=dtype) for t in role] for role in state64]
    # The reference starts from the same rounded values the kernel sees.
    state64 = [[t.to("cpu", torch.float64, copy=True) for t in role] for role in tensors]
    flat = [(p, g, m, v) for p, g, m, v in zip(*tensors)]
    # Compiled at the caller's thread count: inductors without dynamic_threads bake it in.
    _, failure = _run_compiled_buckets(flat, steps, **hyper, allow_serial=False)
    if failure is not None:
        return _describe(failure)
    _single_tensor_nadamw(*state64, steps64, **hyper)
    tolerance = 16 * torch.finfo(dtype).eps
    for role, name in ((0, "param"), (2, "exp_avg"), (3, "exp_avg_sq")):
        for got, expected in zip(tensors[role], state64[role]):
            if not torch.allclose(
                got.to(torch.float64).cpu(), expected, rtol=tolerance, atol=tolerance
            ):
                return f"compiled {name} differs from the float64 reference"
    if not all(torch.equal(a.cpu(), b) for a, b in zip(steps, steps64)):
        return "compiled step counts differ from the reference"
    return None


def _kernel_works(device: torch.device, dtype: torch.dtype, *, requested: bool) -> bool:
    """Whether the compiled kernel runs on (device, dtype), checking it on first use.

    Without an explicit ``fused=True``, a device or setup where compiling is off the
    table falls back quietly; a kernel that fails to compile or to match always warns.
    """
    if device.type not in _COMPILE_DEVICE_TYPES:
        reason: str | None = f"no compiled NAdamW kernel for device type {device.type!r}"
    elif getattr(torch._dynamo.config, "disable", False):
        reason = "torch.compile is disabled (TORCH_COMPILE_DISABLE=1)"
    else:
        key = (device.type, dtype)
        if key not in _KERNEL_STATUS:
            _KERNEL_STATUS[key] = _check_compiled_kernel(device, dtype)
            if _KERNEL_STATUS[key] is not None:
                _warn_fallback(device, dtype, _KERNEL_STATUS[key])
        return _KERNEL_STATUS[key] is None
    if requested and reason not in _WARNED:
        _WARNED.add(reason)
        _warn_fallback(device, dtype, reason)
    return False


def _warn_fallback(device: torch.device, dtype: torch.dtype, reason: str) -> None:
    warnings.warn(
        f"polyak NAdamW: the compiled update is unavailable on {device.type}/{dtype} "
        f"({reason}); using the foreach implementation instead.",
        RuntimeWarning,
        stacklevel=4,
    )


def _fused_nadamw(
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
    flat_cache: dict[int, _FlatEntry] | None = None,
    requested: bool = True,
) -> None:
    if flat_cache is None:
        flat_cache = {}
    hyper = {"beta1": beta1, "beta2": beta2, "lr": lr, "weight_decay": weight_decay, "eps": eps}
    if _is_compiling():
        # Someone is compiling around us: the foreach code traces, a nested compile not.
        _multi_tensor_nadamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper)
        return
    grouped = _group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for (device, dtype), lists in grouped.items():
        if not _kernel_works(device, dtype, requested=requested):
            _multi_tensor_nadamw(*lists, **hyper)
            continue
        flat, flat_steps, rest = [], [], [[] for _ in lists]
        for param, grad, exp_avg, exp_avg_sq, step in zip(*lists):
            entry = flat_cache.get(id(param))
            if entry is None or not entry.is_current(param, exp_avg, exp_avg_sq):
                entry = _flat_entry(param, exp_avg, exp_avg_sq)
                if entry is not None:
                    flat_cache[id(param)] = entry
            # Autograd gives a gradient the dtype of its parameter, not always its strides.
            if entry is None or grad.stride() != entry.stride:
                for target, value in zip(rest, (param, grad, exp_avg, exp_avg_sq, step)):
                    target.append(value)
            else:
                flat.append(
                    (
                        entry.param_flat,
                        entry.flatten(grad),
                        entry.exp_avg_flat,
                        entry.exp_avg_sq_flat,
                    )
                )
                flat_steps.append(step)
        # Largest first, so that buckets hold tensors of like size and the small ones
        # share the buckets that run on one thread.
        order = sorted(range(len(flat)), key=lambda i: flat[i][0].numel(), reverse=True)
        flat = [flat[i] for i in order]
        flat_steps = [flat_steps[i] for i in order]
        updated = 0
        if flat:
            updated, failure = _run_compiled_buckets(flat, flat_steps, **hyper)
            if failure is not None:  # e.g. a recompile for new input properties failed
                _KERNEL_STATUS[(device.type, dtype)] = _describe(failure)
                _warn_fallback(device, dtype, _describe(failure))
        for aliases, step in zip(flat[updated:], flat_steps[updated:]):
            for target, value in zip(rest, (*aliases, step)):
                target.append(value)
        if rest[0]:
            _multi_tensor_nadamw(*rest, **hyper)


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
