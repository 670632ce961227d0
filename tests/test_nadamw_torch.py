"""Tests for polyak.optim.nadamw_torch against a float64 numpy reference of the math.

The reference below is written from the update's definition (arXiv:1910.05446, Table 1,
with decoupled weight decay applied first, as AlgoPerf's torch baseline does) and from
the AlgoPerf schedule's definition, independently of the code under test.

The compiled (fused) path is compiled once, in float32 on CPU; every other test runs the
foreach and single-tensor paths, or the kernel's math eagerly, so the file stays fast.
"""

from __future__ import annotations

import copy
import io
import math
import types
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak.optim import nadamw_torch_compiled
from polyak.optim.nadamw_config import NadamWConfig
from polyak.optim.nadamw_torch import NAdamW, make_nadamw

DEFAULT_HYPERPARAMETERS = NadamWConfig.DEFAULT_HYPERPARAMETERS

SHAPES: list[tuple[int, ...]] = [(4, 3), (7,), (2, 3, 5), (1,), (3, 2, 2, 2)]

HYPERPARAMETERS = {
    "learning_rate": 0.01,
    "one_minus_beta1": 0.1,
    "beta2": 0.99,
    "weight_decay": 0.1,
    "warmup_factor": 0.1,
}


# ---------------------------------------------------------------------------------------
# Independent reference.


def reference_multiplier(count: int, warmup_steps: int, step_hint: int) -> float:
    """AlgoPerf's schedule: linear warmup from 0, cosine to 0 at step_hint, then 0."""
    if count < warmup_steps:
        return count / warmup_steps
    if count >= step_hint:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (count - warmup_steps) / (step_hint - warmup_steps)))


def reference_nadamw(
    params: Sequence[np.ndarray],
    grads_per_step: Sequence[Sequence[np.ndarray]],
    learning_rates: Sequence[float],
    *,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> list[np.ndarray]:
    params = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, (grads, lr) in enumerate(zip(grads_per_step, learning_rates), start=1):
        for i, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64)
            params[i] = params[i] * (1.0 - lr * weight_decay)
            m[i] = beta1 * m[i] + (1.0 - beta1) * g
            v[i] = beta2 * v[i] + (1.0 - beta2) * g * g
            m_hat = (beta1 * m[i] + (1.0 - beta1) * g) / (1.0 - beta1**t)
            v_hat = v[i] / (1.0 - beta2**t)
            params[i] = params[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def random_problem(
    shapes: Sequence[tuple[int, ...]], num_steps: int, seed: int
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape) for shape in shapes]
    grads = [[rng.standard_normal(shape) for shape in shapes] for _ in range(num_steps)]
    return params, grads


def torch_params(arrays: Sequence[np.ndarray], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for a in arrays]


def run_steps(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grads_per_step: Sequence[Sequence[np.ndarray]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad = torch.tensor(grad, dtype=param.dtype).to(
                memory_format=_memory_format(param)
            )
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _memory_format(param: torch.Tensor) -> torch.memory_format:
    channels_last = param.dim() == 4 and not param.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def use_implementation(optimizer: torch.optim.Optimizer, implementation: str) -> None:
    """Selects "single", "foreach", "fused", or "auto" (both flags None: the default)."""
    for group in optimizer.param_groups:
        auto = implementation == "auto"
        group["foreach"] = None if auto else implementation == "foreach"
        group["fused"] = None if auto else implementation == "fused"


def assert_close_to(
    actual: Sequence[torch.Tensor], expected: Sequence[np.ndarray], rtol: float, atol: float
) -> None:
    for index, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(
            a.detach().double().numpy(), e, rtol=rtol, atol=atol, err_msg=f"param {index}"
        )


def use_eager_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the fused path's kernel uncompiled: its math, without paying for a compile."""
    monkeypatch.setattr(nadamw_torch_compiled, "_KERNEL_STATUS", {})
    monkeypatch.setattr(
        nadamw_torch_compiled, "_compiled_kernel", lambda: nadamw_torch_compiled._nadamw_kernel
    )


@pytest.fixture
def eager_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    use_eager_kernel(monkeypatch)


def compiled_kernel_or_skip() -> None:
    """Compiles the real kernel for CPU float32 (once per process) or skips."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        works = nadamw_torch_compiled._kernel_works(
            torch.device("cpu"), torch.float32, requested=True
        )
    if not works:
        reason = nadamw_torch_compiled._KERNEL_STATUS[("cpu", torch.float32)]
        pytest.skip(f"torch.compile unavailable here: {reason}")


# ---------------------------------------------------------------------------------------
# Parity with the reference, schedule included.


@pytest.mark.parametrize("implementation", ["foreach", "single", "eager_kernel"])
def test_matches_reference_in_float64_with_schedule(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if implementation == "eager_kernel":
        use_eager_kernel(monkeypatch)
    step_hint, num_steps = 100, 110  # past step_hint, where the rate must hold at 0
    arrays, grads = random_problem(SHAPES, num_steps, seed=0)
    params = torch_params(arrays, torch.float64)
    optimizer, scheduler = make_nadamw(
        params, NadamWConfig.from_hyperparameters(HYPERPARAMETERS), step_hint
    )
    use_implementation(optimizer, "fused" if implementation == "eager_kernel" else implementation)

    run_steps(optimizer, params, grads, scheduler)

    warmup_steps = int(HYPERPARAMETERS["warmup_factor"] * step_hint)
    learning_rates = [
        HYPERPARAMETERS["learning_rate"] * reference_multiplier(count, warmup_steps, step_hint)
        for count in range(num_steps)
    ]
    expected = reference_nadamw(
        arrays,
        grads,
        learning_rates,
        beta1=1.0 - HYPERPARAMETERS["one_minus_beta1"],
        beta2=HYPERPARAMETERS["beta2"],
        weight_decay=HYPERPARAMETERS["weight_decay"],
        eps=1e-8,
    )
    assert_close_to(params, expected, rtol=1e-5, atol=1e-10)
    # The parameters moved far enough for the comparison to mean something.
    assert max(np.abs(e - a).max() for e, a in zip(expected, arrays)) > 1e-2
    for param in params:
        assert optimizer.state[param]["step"].item() == num_steps


def test_float32_stays_close_to_float64_reference() -> None:
    step_hint, num_steps = 100, 100
    arrays, grads = random_problem(SHAPES, num_steps, seed=1)
    params = torch_params(arrays, torch.float32)
    optimizer, scheduler = make_nadamw(
        params, NadamWConfig.from_hyperparameters(HYPERPARAMETERS), step_hint
    )
    use_implementation(optimizer, "foreach")
    run_steps(optimizer, params, grads, scheduler)
    warmup_steps = int(HYPERPARAMETERS["warmup_factor"] * step_hint)
    learning_rates = [
        HYPERPARAMETERS["learning_rate"] * reference_multiplier(count, warmup_steps, step_hint)
        for count in range(num_steps)
    ]
    expected = reference_nadamw(
        arrays,
        grads,
        learning_rates,
        beta1=1.0 - HYPERPARAMETERS["one_minus_beta1"],
        beta2=HYPERPARAMETERS["beta2"],
        weight_decay=HYPERPARAMETERS["weight_decay"],
        eps=1e-8,
    )
    assert_close_to(params, expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    beta1=st.floats(0.0, 0.999),
    beta2=st.floats(0.0, 0.9999),
    weight_decay=st.floats(0.0, 1.0),
    lr=st.floats(0.0, 0.1),
    eps=st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
    foreach=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_valid_hyperparameters_match_reference(
    beta1: float,
    beta2: float,
    weight_decay: float,
    lr: float,
    eps: float,
    foreach: bool,
    seed: int,
) -> None:
    num_steps = 6
    arrays, grads = random_problem([(3, 2), (5,)], num_steps, seed)
    params = torch_params(arrays, torch.float64)
    optimizer = NAdamW(
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=foreach
    )
    run_steps(optimizer, params, grads)
    expected = reference_nadamw(
        arrays,
        grads,
        [lr] * num_steps,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
    )
    assert_close_to(params, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# The implementations agree with each other.


def _model_like_shapes() -> list[tuple[int, ...]]:
    # More tensors than one compiled bucket holds, so a full and a padded bucket run;
    # a size-1 tensor and a channels_last one take the foreach and permuted routes.
    shapes = [(5, 3), (3,), (2, 3, 4), (9,), (1,), (2, 3, 2, 2)] * 4
    assert len(shapes) > nadamw_torch_compiled.COMPILED_BUCKET_SIZE
    return shapes


def _train(
    implementation: str, dtype: torch.dtype, num_steps: int, channels_last: bool = True
) -> tuple[list[torch.Tensor], NAdamW]:
    shapes = _model_like_shapes()
    arrays, grads = random_problem(shapes, num_steps, seed=2)
    params = torch_params(arrays, dtype)
    if channels_last:
        for param in params:
            if param.dim() == 4:
                param.data = param.data.to(memory_format=torch.channels_last)
    optimizer = NAdamW(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    use_implementation(optimizer, implementation)
    run_steps(optimizer, params, grads)
    return params, optimizer


def test_foreach_and_single_tensor_agree() -> None:
    single, _ = _train("single", torch.float32, num_steps=20)
    foreach, _ = _train("foreach", torch.float32, num_steps=20)
    for a, b in zip(single, foreach):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_path_agrees_with_foreach_and_single(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled_kernel_or_skip()
    calls = []
    original = nadamw_torch_compiled._run_compiled_buckets

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(nadamw_torch_compiled, "_run_compiled_buckets", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback
        fused, optimizer = _train("fused", torch.float32, num_steps=25)
    single, _ = _train("single", torch.float32, num_steps=25)
    foreach, _ = _train("foreach", torch.float32, num_steps=25)
    # Every tensor but the size-1 ones went through the compiled kernel.
    num_size_one = sum(1 for shape in _model_like_shapes() if math.prod(shape) == 1)
    assert calls == [len(_model_like_shapes()) - num_size_one] * 25
    for f, s, e in zip(fused, single, foreach):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-6)
    assert fused[5].is_contiguous(memory_format=torch.channels_last)
    for param in fused:
        assert optimizer.state[param]["step"].item() == 25


def test_eager_kernel_matches_foreach_in_float64(eager_kernel: None) -> None:
    fused, _ = _train("fused", torch.float64, num_steps=15)
    foreach, _ = _train("foreach", torch.float64, num_steps=15)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_path_follows_a_replaced_param_data(eager_kernel: None) -> None:
    # The fused path caches flat views; a swapped ``param.data`` must not be missed.
    results = {}
    for implementation in ("fused", "foreach"):
        arrays, grads = random_problem([(4, 4), (6,)], 4, seed=3)
        params = torch_params(arrays, torch.float64)
        optimizer = NAdamW(params, lr=0.05, weight_decay=0.1)
        use_implementation(optimizer, implementation)
        run_steps(optimizer, params, grads[:2])
        params[0].data = params[0].data.clone() * 2.0
        run_steps(optimizer, params, grads[2:])
        results[implementation] = [p.detach().clone() for p in params]
    for a, b in zip(results["fused"], results["foreach"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_params_without_grad_are_left_alone() -> None:
    params = torch_params([np.ones((2, 2)), np.ones(3)], torch.float64)
    optimizer = NAdamW(params, lr=0.1, foreach=True)
    params[0].grad = torch.ones(2, 2, dtype=torch.float64)
    optimizer.step()
    assert params[1] not in optimizer.state
    torch.testing.assert_close(params[1].detach(), torch.ones(3, dtype=torch.float64))
    assert not torch.equal(params[0].detach(), torch.ones(2, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# The default compiles once the steps taken would have paid for the compile.


def pay_back_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Makes the default switch to the compiled kernel at ``step`` for the test model."""
    numel = sum(math.prod(shape) for shape in _model_like_shapes())
    monkeypatch.setitem(nadamw_torch_compiled.PAYBACK_ELEMENT_STEPS, "cpu", float(step * numel))


def record_compiled_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The step counts at which the model's tensors went through the kernel."""
    model_tensors = sum(1 for shape in _model_like_shapes() if math.prod(shape) > 1)
    steps: list[int] = []
    original = nadamw_torch_compiled._run_compiled_buckets

    def recording(flat, flat_steps, **kwargs):
        if len(flat) == model_tensors:  # not the self-check's tiny problem
            steps.append(int(flat_steps[0].item()) + 1)
        return original(flat, flat_steps, **kwargs)

    monkeypatch.setattr(nadamw_torch_compiled, "_run_compiled_buckets", recording)
    return steps


def test_first_compiled_step_is_where_foreach_time_equals_compile_time() -> None:
    payback = nadamw_torch_compiled.PAYBACK_ELEMENT_STEPS["cpu"]
    for numel in (1, 1000, 10**6, 15 * 10**6, 10**9, 10**13):
        first = nadamw_torch_compiled.first_compiled_step("cpu", numel)
        assert first is not None and first >= 1
        assert first * numel >= payback or first == 1
        assert (first - 1) * numel < payback
    assert nadamw_torch_compiled.first_compiled_step("mps", 10**9) is None
    assert nadamw_torch_compiled.first_compiled_step("cpu", 0) is None


def test_default_does_not_compile_a_small_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compile():
        raise AssertionError("the default compiled a model too small to pay back")

    monkeypatch.setattr(nadamw_torch_compiled, "_KERNEL_STATUS", {})
    monkeypatch.setattr(nadamw_torch_compiled, "_compiled_kernel", no_compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto, _ = _train("auto", torch.float32, num_steps=20)
    foreach, _ = _train("foreach", torch.float32, num_steps=20)
    for a, b in zip(auto, foreach):
        assert torch.equal(a, b)


def test_default_switches_at_the_payback_step(monkeypatch: pytest.MonkeyPatch) -> None:
    use_eager_kernel(monkeypatch)
    pay_back_at(monkeypatch, 4)
    compiled_steps = record_compiled_steps(monkeypatch)
    auto, optimizer = _train("auto", torch.float64, num_steps=8)
    assert compiled_steps == [4, 5, 6, 7, 8]
    foreach, _ = _train("foreach", torch.float64, num_steps=8)
    for a, b in zip(auto, foreach):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(optimizer.state[p]["step"].item() == 8 for p in auto)


def test_switch_to_the_compiled_kernel_stays_within_the_paths_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled_kernel_or_skip()
    pay_back_at(monkeypatch, 10)
    compiled_steps = record_compiled_steps(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        switched, _ = _train("auto", torch.float32, num_steps=25)
    assert compiled_steps == list(range(10, 26))
    foreach, _ = _train("foreach", torch.float32, num_steps=25)
    fused, _ = _train("fused", torch.float32, num_steps=25)
    for s, e, f in zip(switched, foreach, fused):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("switch_step", [5, 15])  # before and after the checkpoint at 12
def test_resume_across_the_switch_is_exact(
    monkeypatch: pytest.MonkeyPatch, switch_step: int
) -> None:
    use_eager_kernel(monkeypatch)
    pay_back_at(monkeypatch, switch_step)
    compiled_steps = record_compiled_steps(monkeypatch)
    _round_trip_equals_uninterrupted("auto", torch.float64)
    assert min(compiled_steps) == switch_step


# ---------------------------------------------------------------------------------------
# Falling back from the compiled path.


def test_compile_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile():
        raise RuntimeError("no C++ compiler in this test")

    monkeypatch.setattr(nadamw_torch_compiled, "_KERNEL_STATUS", {})
    monkeypatch.setattr(nadamw_torch_compiled, "_compiled_kernel", broken_compile)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
        fused, _ = _train("fused", torch.float64, num_steps=5)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    foreach, _ = _train("foreach", torch.float64, num_steps=5)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_disabled_is_quiet_unless_fused_was_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    monkeypatch.setattr(nadamw_torch_compiled, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto, _ = _train("auto", torch.float64, num_steps=3)
    with pytest.warns(RuntimeWarning, match="TORCH_COMPILE_DISABLE"):
        fused, _ = _train("fused", torch.float64, num_steps=3)
    foreach, _ = _train("foreach", torch.float64, num_steps=3)
    for a, b, c in zip(auto, fused, foreach):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_wrong_kernel_is_rejected_by_the_self_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def lazy_kernel(params, grads, exp_avgs, exp_avg_sqs, coefficients):
        del params, grads, exp_avgs, exp_avg_sqs, coefficients  # updates nothing

    monkeypatch.setattr(nadamw_torch_compiled, "_KERNEL_STATUS", {})
    monkeypatch.setattr(nadamw_torch_compiled, "_compiled_kernel", lambda: lazy_kernel)
    with pytest.warns(RuntimeWarning, match="differs from the float64 reference"):
        fused, _ = _train("fused", torch.float64, num_steps=3)
    foreach, _ = _train("foreach", torch.float64, num_steps=3)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_failure_part_way_finishes_with_foreach(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first bucket runs, the second fails: each tensor must still be updated once.
    calls = {"count": 0}

    def fails_on_second_call(*args):
        calls["count"] += 1
        if calls["count"] == 3:  # call 1 is the self-check; 2 and 3 the first step
            raise RuntimeError("recompile failed")
        return nadamw_torch_compiled._nadamw_kernel(*args)

    monkeypatch.setattr(nadamw_torch_compiled, "_KERNEL_STATUS", {})
    monkeypatch.setattr(nadamw_torch_compiled, "_compiled_kernel", lambda: fails_on_second_call)
    with pytest.warns(RuntimeWarning, match="recompile failed"):
        fused, optimizer = _train("fused", torch.float64, num_steps=3, channels_last=False)
    foreach, _ = _train("foreach", torch.float64, num_steps=3, channels_last=False)
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(optimizer.state[p]["step"].item() == 3 for p in fused)


# ---------------------------------------------------------------------------------------
# Checkpoints: continuing after a reload equals never stopping, bit for bit.


def _round_trip_equals_uninterrupted(
    implementation: str, dtype: torch.dtype, prepare: Callable[[], None] = lambda: None
) -> None:
    prepare()
    shapes = _model_like_shapes()
    step_hint, first, second = 40, 12, 10
    arrays, grads = random_problem(shapes, first + second, seed=4)

    params = torch_params(arrays, dtype)
    optimizer, scheduler = make_nadamw(
        params, NadamWConfig.from_hyperparameters(HYPERPARAMETERS), step_hint
    )
    use_implementation(optimizer, implementation)
    run_steps(optimizer, params, grads[:first], scheduler)
    buffer = io.BytesIO()
    torch.save(
        {
            "params": [p.detach().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        buffer,
    )
    run_steps(optimizer, params, grads[first:], scheduler)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p) for p in checkpoint["params"]]
    optimizer2, scheduler2 = make_nadamw(
        resumed, NadamWConfig.from_hyperparameters(None), step_hint
    )  # state overrides all
    optimizer2.load_state_dict(checkpoint["optimizer"])
    scheduler2.load_state_dict(checkpoint["scheduler"])
    run_steps(optimizer2, resumed, grads[first:], scheduler2)

    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[a][key], optimizer2.state[b][key])
    assert optimizer.param_groups[0]["lr"] == optimizer2.param_groups[0]["lr"]


@pytest.mark.parametrize("implementation", ["foreach", "single"])
def test_state_dict_round_trip_is_exact(implementation: str) -> None:
    _round_trip_equals_uninterrupted(implementation, torch.float64)


def test_state_dict_round_trip_is_exact_when_compiled() -> None:
    _round_trip_equals_uninterrupted("fused", torch.float32, prepare=compiled_kernel_or_skip)


def test_load_state_dict_does_not_share_tensors_with_the_source() -> None:
    arrays, grads = random_problem([(3, 3)], 3, seed=5)
    params = torch_params(arrays, torch.float64)
    optimizer = NAdamW(params, lr=0.1, foreach=True)
    run_steps(optimizer, params, grads[:1])
    source = optimizer.state_dict()
    snapshot = copy.deepcopy(source)

    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer2 = NAdamW(clone, lr=0.1, foreach=True)
    optimizer2.load_state_dict(source)
    run_steps(optimizer2, clone, grads[1:])
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(source["state"][0][key], snapshot["state"][0][key])
    assert optimizer2.state[clone[0]]["step"].device.type == "cpu"


# ---------------------------------------------------------------------------------------
# Hyperparameters: defaults, lookup and validation.


@pytest.mark.parametrize(
    "hyperparameters",
    [
        None,
        {"learning_rate": 0.5},
        types.SimpleNamespace(learning_rate=0.5, beta2=None),
    ],
)
def test_make_nadamw_reads_hyperparameters_with_defaults(hyperparameters: object) -> None:
    step_hint = 1000
    params = torch_params([np.zeros(3)], torch.float64)
    optimizer, scheduler = make_nadamw(
        params, NadamWConfig.from_hyperparameters(hyperparameters), step_hint
    )
    group = optimizer.param_groups[0]
    peak = 0.5 if hyperparameters is not None else DEFAULT_HYPERPARAMETERS["learning_rate"]
    assert group["initial_lr"] == peak
    assert group["betas"] == (1.0 - 0.02686663061, 0.9981232922116359)
    assert group["weight_decay"] == 0.16375311233774334
    assert group["eps"] == 1e-8
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    warmup_steps = 100  # 0.1 * 1000
    assert group["lr"] == 0.0  # the first step of the warmup
    for count in range(1, 150):
        optimizer.step()
        scheduler.step()
        expected = peak * reference_multiplier(count, warmup_steps, step_hint)
        assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"betas": (1.0, 0.99)}, r"betas\[0\]=1.0"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]=-0.1"),
        ({"betas": (0.9,)}, "betas=.*pair"),
        ({"eps": -1e-8}, "eps=-1e-08"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"fused": True, "foreach": True}, "mutually exclusive"),
    ],
)
def test_bad_optimizer_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    params = torch_params([np.zeros(2)], torch.float32)
    with pytest.raises(ValueError, match=message):
        NAdamW(params, **kwargs)


def test_bad_param_group_raises_clear_error() -> None:
    optimizer = NAdamW(torch_params([np.zeros(2)], torch.float32))
    with pytest.raises(ValueError, match="weight_decay=-1"):
        optimizer.add_param_group(
            {"params": torch_params([np.zeros(2)], torch.float32), "weight_decay": -1}
        )


@pytest.mark.parametrize(
    ("overrides", "step_hint", "message"),
    [
        ({"learning_rate": -1.0}, 100, "learning_rate=-1.0"),
        ({"one_minus_beta1": 0.0}, 100, "one_minus_beta1=0.0"),
        ({"one_minus_beta1": 1.5}, 100, "one_minus_beta1=1.5"),
        ({"beta2": 1.0}, 100, "beta2=1.0"),
        ({"weight_decay": -0.5}, 100, "weight_decay=-0.5"),
        ({"warmup_factor": 1.5}, 100, "warmup_factor=1.5"),
        ({"learning_rate": "fast"}, 100, "learning_rate='fast'"),
        ({}, 0, "step_hint=0"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(
    overrides: dict, step_hint: int, message: str
) -> None:
    params = torch_params([np.zeros(2)], torch.float32)
    with pytest.raises(ValueError, match=message):
        make_nadamw(
            params, NadamWConfig.from_hyperparameters({**HYPERPARAMETERS, **overrides}), step_hint
        )
