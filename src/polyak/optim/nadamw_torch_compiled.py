"""The compiled (fused) path of polyak's torch NAdamW: one pass over memory per tensor.

foreach needs about a dozen passes over memory per step, and on CPU the update is bound
by memory bandwidth. :func:`fused_nadamw` runs the whole update of
:mod:`polyak.optim.nadamw_torch` through one ``torch.compile``-d kernel instead. It
takes flat 1-D aliases of up to ``COMPILED_BUCKET_SIZE`` tensors per call, so one graph
with dynamic sizes serves any model. The kernel is compiled once per (device type,
dtype) on first use, checked against a float64 reference on a tiny problem, and
replaced by the foreach path with a single warning if either step fails.

When to compile. AlgoPerf counts the compile as submission time, at the first step of
every process and of every resume: 25-79 s per process in AlgoPerf's harness, while its
own NAdamW baseline takes 0.61 s for that step. ``scripts/bench_nadamw_torch_startup.py``
on 14.8M parameters (120 tensors, one thread, a 2-core CPU shared with other jobs,
medians of 3 fresh processes, cold inductor cache) saw:

    load  steps  variant   first step  later steps  whole run
      7     50   foreach      0.7 s      289 ms        15 s
      7     50   default      0.7 s      474 ms        24 s   (foreach here; load noise)
      7     50   compiled    95 s         65 ms        98 s
      8    400   foreach      0.4 s      104 ms        42 s
      8    400   default      0.3 s   (compiles at 271)    106 s
      8    400   compiled    37 s         28 ms        48 s

(the default then switched at C/(s·n) = 4e9/n = step 271; with 5e9 now, step 338), and
with a warm cache a compiled first step of 7.9 s (foreach: 0.3 s). The compile pays
back, but only after a few hundred steps at that size (37 s / 76 ms = 490 steps), and
never for a small model or a short run.

So ``fused=None`` (the default) rents before it buys: a (device, dtype) group of n
elements runs foreach until its step count reaches ``C/(s·n)`` (``PAYBACK_ELEMENT_STEPS``
= C/s, the compile time over the time saved per element-step), and compiles then. By
then the extra foreach time equals the compile time, so the whole run never costs more
than twice the better of "compile at step 1" and "never compile", whatever its length
(400 steps, just past the switch, is about the worst case), and the first step is a
foreach step. The switch depends on the step counts in the optimizer state, not on the
clock, so a run, its resumption and every DDP rank switch at the same step and
trajectories reproduce; a run resumed past that step compiles at its first step (a
persistent ``TORCHINDUCTOR_CACHE_DIR`` cuts that to the warm figure). The switch moves
the trajectory by what separates foreach from the kernel: after 40 float32 steps on the
model above, switching at step 20 was 2.7e-5 (relative to the parameters'
displacement) from foreach only, and compiled only was 3.7e-5 from it; the tests hold the paths to
1e-5 of each other elementwise. A compile in a background thread was tried and dropped:
while it ran (load 10), foreach steps took 18 s instead of 0.5 s (the GIL and the
cores are shared), and the main thread's first call recompiled the kernel (19 s).
``fused=True`` compiles at the first step; ``foreach=True`` never compiles.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polyak.optim.nadamw_torch import (
    _group_by_device_and_dtype,
    _multi_tensor_nadamw,
    _single_tensor_nadamw,
)

__all__ = ["COMPILED_BUCKET_SIZE", "FlatCache", "fused_nadamw"]

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

# When the default (``fused=None``) compiles, per device type: the one-off compile time C
# over the time s the kernel saves per element and step, in element-steps. A group of n
# elements runs foreach until its step count reaches C/(s·n), then compiles: the steps
# taken by then would have paid for the compile (see the module docstring).
PAYBACK_ELEMENT_STEPS: dict[str, float] = {
    # Measured (module docstring): C = 37 s and s·n = 76 ms at n = 14.8M (7e9) at load 8,
    # C = 110 s and s·n = 0.42 s (4e9) at load 10.
    "cpu": 5e9,
    # Estimated, not measured here: C = 25-79 s per process (AlgoPerf's harness on
    # GPUs), and s = 80 bytes of memory traffic saved per element at about 1.5 TB/s.
    "cuda": 1e12,
    "xpu": 1e12,
}


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


# id(param) -> its aliases; owned by the optimizer, so that views live as long as it.
FlatCache = dict[int, _FlatEntry]


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


def first_compiled_step(device_type: str, numel: int) -> int | None:
    """The step (1-based) from which ``fused=None`` compiles a group of ``numel`` elements.

    None where the default never compiles (no inductor backend for the device type).
    """
    payback = PAYBACK_ELEMENT_STEPS.get(device_type)
    if payback is None or numel < 1:
        return None
    return max(1, math.ceil(payback / numel))


def _compile_has_paid_back(device: torch.device, params: list[Tensor], steps: list[Tensor]) -> bool:
    # A function of the step counts in the optimizer state, not of the clock: runs,
    # resumed runs and DDP ranks switch at the same step, so trajectories reproduce.
    first = first_compiled_step(device.type, sum(param.numel() for param in params))
    return first is not None and max(step.item() for step in steps) + 1 >= first


def fused_nadamw(
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
    flat_cache: FlatCache | None = None,
    requested: bool = True,
) -> None:
    """NAdamW through the compiled kernel, foreach for what it cannot take.

    ``requested`` (``fused=True``) compiles at once and warns where it cannot;
    otherwise a group compiles from :func:`first_compiled_step` on, quietly.
    """
    if flat_cache is None:
        flat_cache = {}
    hyper = {"beta1": beta1, "beta2": beta2, "lr": lr, "weight_decay": weight_decay, "eps": eps}
    if _is_compiling():
        # Someone is compiling around us: the foreach code traces, a nested compile not.
        _multi_tensor_nadamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, **hyper)
        return
    grouped = _group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for (device, dtype), lists in grouped.items():
        if not requested and not _compile_has_paid_back(device, lists[0], lists[4]):
            _multi_tensor_nadamw(*lists, **hyper)
            continue
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
