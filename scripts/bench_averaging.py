"""What weight averaging costs: ratios measured side by side in one process.

Not a test: it prints medians over repeats, and the ratios the issue
"Averaging at no cost and at scale" sets goals for.

(a) Step time with averaging / without, through the AlgoPerf torch builder
    (``update_params``): LAWA (ν = 64, L = 20) and EMA (ν = 64, β = 0.9), each
    in device and host placement, on the embedded ``digits`` workload and on a
    ~25M-parameter MLP. Variants train side by side on copies of one model,
    in interleaved blocks with the collection in the middle of each block (so
    a host fold finishes, or shows, inside its own block). On the embedded
    workload a block is 64 steps (one collection period). On the big model,
    where one CPU step takes seconds, a block is the 16 steps around a
    collection (4 before, 11 after), the step counter then jumps to the
    next period, and the ratio is 1 + (block − baseline block) / (64 × the
    baseline step): the collection's whole cost, amortized over its period.
    Goal ≤ 1.01.
(b) ``prepare_for_eval`` (swap in the average) + restore, over the time of
    one copy of the parameters (``torch._foreach_copy_`` into preallocated
    tensors), on the 25M model. Goal ≤ 3.
(c) One EMA update per step (β = 0.9, ν = 1) by polyak / by each of
    ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``,
    timm's ``ModelEmaV3`` and ``ema_pytorch.EMA``, on the 25M model. polyak's
    device update includes its finiteness check (a non-finite snapshot is
    never collected); the others have none. polyak's host update is what the
    step path waits for, with a training step between updates, so its fold
    overlaps that step, as in training. Goal ≤ 1.0.

timm needs torchvision, which must match torch; keep them out of the test
environment and run this in a separate one:

    python -m venv bench_venv
    bench_venv/bin/pip install torch torchvision timm ema-pytorch && bench_venv/bin/pip install -e .
    bench_venv/bin/python scripts/bench_averaging.py

Packages that do not import are reported and their (c) rows skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from absl import app, flags, logging
from torch import nn

from polyak.algoperf.builder_torch import build_submission
from polyak.averaging.averager_torch import TorchAverager
from polyak.averaging.config import AveragingConfig
from polyak.optim.nadamw_config import NadamWConfig
from polyak.optim.nadamw_torch import make_nadamw

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Interleaved rounds of (a) on the embedded workload.")
flags.DEFINE_integer("big_rounds", 3, "Interleaved rounds of (a) on the 25M model.")
flags.DEFINE_integer("repeats", 7, "Repeats of each timing in (b) and (c).")
flags.DEFINE_integer("width", 2048, "Hidden width of the big MLP (2048: ~25M parameters).")
flags.DEFINE_integer("big_batch", 8, "Batch size of the big MLP.")
flags.DEFINE_list("parts", ["a", "b", "c"], "Which parts to run.")
flags.DEFINE_integer(
    "threads", 1, "torch intra-op threads (1 avoids OpenMP spin-waits on a shared machine)."
)

EVERY, WINDOW, BETA = 64, 20, 0.9
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "lawa/device": {"averaging": "lawa", "lawa_window": WINDOW},
    "lawa/host": {"averaging": "lawa", "lawa_window": WINDOW, "averaging_placement": "host"},
    "ema/device": {"averaging": "ema", "ema_beta": BETA},
    "ema/host": {"averaging": "ema", "ema_beta": BETA, "averaging_placement": "host"},
}


# -- the models -------------------------------------------------------------------


class BigMLP(nn.Module):
    """~25M parameters at width 2048: 512 → 6 × width → 1000 classes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(512, width), nn.GELU()]
        for _ in range(5):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers.append(nn.Linear(width, 1000))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BigMLPWorkload:
    """Enough of AlgoPerf's Workload interface for the torch builder."""

    workload_name = "big_mlp"
    metrics_logger = None

    def __init__(self, width: int, batch: int) -> None:
        self.width = width
        self.batch = batch
        self.step_hint = 100_000

    def init_model_fn(self, seed: int) -> tuple[nn.Module, None]:
        torch.manual_seed(seed)
        return BigMLP(self.width), None

    def model_fn(self, params, augmented_and_preprocessed_input_batch, model_state, mode, rng,
                 update_batch_norm, dropout_rate):  # fmt: skip
        del mode, rng, update_batch_norm, dropout_rate
        return params(augmented_and_preprocessed_input_batch["inputs"]), model_state

    def loss_fn(self, label_batch, logits_batch, mask_batch=None, label_smoothing=0.0):
        per_example = nn.functional.cross_entropy(
            logits_batch, label_batch, reduction="none", label_smoothing=label_smoothing
        )
        return {
            "summed": per_example.sum(),
            "n_valid_examples": torch.tensor(float(per_example.numel())),
            "per_example": per_example,
        }

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        fixed = [
            {
                "inputs": torch.randn(self.batch, 512, generator=generator),
                "targets": torch.randint(0, 1000, (self.batch,), generator=generator),
            }
            for _ in range(8)
        ]
        while True:
            yield from fixed


# -- (a) step time -----------------------------------------------------------------


@dataclasses.dataclass
class _Trainer:
    """One variant: its own model copy, optimizer state and data stream."""

    name: str
    submission: Any
    workload: Any
    model: nn.Module
    model_state: Any
    state: Any
    hyperparameters: Any
    batches: Iterator[Any]
    global_step: int = 0

    def jump_to(self, step: int) -> None:
        """Skips the step counter ahead; the collection rule only reads it."""
        self.global_step = step

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.model, self.model_state = self.submission.update_params(
                self.workload, self.model, None, self.model_state, self.hyperparameters,
                next(self.batches), None, self.state, [], self.global_step, None,
            )  # fmt: skip
            self.global_step += 1
        # A host fold still running belongs to this block.
        self.state["averager"].num_collected  # noqa: B018 - joins the worker
        return time.perf_counter() - start


def _trainers(workload: Any, batches: Callable[[], Iterator[Any]]) -> list[_Trainer]:
    submission = build_submission(make_nadamw, NadamWConfig)
    defaults = NadamWConfig.DEFAULT_HYPERPARAMETERS
    model, model_state = workload.init_model_fn(0)
    trainers = []
    for name, settings in VARIANTS.items():
        hp = types.SimpleNamespace(**{**defaults, **settings, "averaging_every": EVERY})
        replica = copy.deepcopy(model)
        state = submission.init_optimizer_state(workload, replica, model_state, hp, None)
        trainers.append(
            _Trainer(name, submission, workload, replica, model_state, state, hp, batches())
        )
    return trainers


def _step_time_ratios(label: str, workload: Any, batches: Callable[[], Iterator[Any]],
                      rounds: int, block: int = EVERY) -> None:  # fmt: skip
    """Interleaved blocks of ``block`` steps, each with one collection after
    ``block // 2`` steps (``block // 4`` for short blocks)."""
    trainers = _trainers(workload, batches)
    before = block // 2 if block == EVERY else block // 4
    # Start past the builder's every-step logging (the first 100 steps).
    first = 4 * EVERY - before
    warm_up = block if block == EVERY else block // 4
    for trainer in trainers:
        trainer.jump_to(first - warm_up)
        trainer.run(warm_up)  # allocations, caches
    times: dict[str, list[float]] = {t.name: [] for t in trainers}
    rng = np.random.default_rng(0)
    for round_index in range(rounds):
        for index in rng.permutation(len(trainers)):
            trainer = trainers[index]
            trainer.jump_to(first + round_index * EVERY)
            times[trainer.name].append(trainer.run(block))
    baseline = statistics.median(times["none"])
    step = baseline / block
    print(f"\n(a) step time with averaging / without — {label}")
    print(
        f"    baseline: {1e3 * step:.3f} ms/step (median of {rounds} blocks of {block} steps, "
        f"one collection per {EVERY} steps)"
    )
    for trainer in trainers:
        if trainer.name == "none":
            continue
        extra_per_collection = statistics.median(times[trainer.name]) - baseline
        ratio = 1.0 + extra_per_collection / (EVERY * step)
        # Cross-check from the averager's own timers (means since the last
        # training log): what collect() cost the step path, amortized.
        timings = trainer.state["averager"].timings.drain_ms()
        collect_ms = timings.get("averaging/collect_ms", 0.0)
        fold_ms = timings.get("averaging/fold_ms")
        background = f", + {fold_ms:.1f} ms folding on the worker" if fold_ms else ""
        print(
            f"    {trainer.name:12s} {ratio:7.4f}   (goal <= 1.01)   "
            f"block: {1e3 * extra_per_collection:+.1f} ms per collection; timers: collect "
            f"{collect_ms:.1f} ms{background} -> {1 + collect_ms / (1e3 * EVERY * step):.4f}"
        )


def _digits() -> tuple[Any, Callable[[], Iterator[Any]]] | None:
    try:
        from polyak.workloads import prng
        from polyak.workloads.registry import make_workload
    except ImportError:
        return None
    workload = make_workload("digits", "pytorch")
    batch_size = 64

    def batches() -> Iterator[Any]:
        return workload._build_input_queue(
            prng.prng_key(0),
            "train",
            data_dir=None,
            global_batch_size=batch_size,
        )

    return workload, batches


# -- (b) swap + restore ---------------------------------------------------------------


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _paired(measured: Callable[[], Any], reference: Callable[[], Any], repeats: int) -> tuple:
    """Median of per-pair time ratios, and the median times (s).

    The two alternate (ABBA), so a shared machine's drifting load hits both.
    """
    measured(), reference()  # warm-up (allocations, first touch of pages)
    ratios, measured_times, reference_times = [], [], []
    for index in range(repeats):
        if index % 2:
            b, a = _seconds(reference), _seconds(measured)
        else:
            a, b = _seconds(measured), _seconds(reference)
        ratios.append(a / b)
        measured_times.append(a)
        reference_times.append(b)
    return (
        statistics.median(ratios),
        statistics.median(measured_times),
        statistics.median(reference_times),
    )


def _filled_averager(model: nn.Module, config: AveragingConfig, collections: int) -> TorchAverager:
    averager = TorchAverager(config, model)
    with torch.no_grad():
        for index in range(collections):
            for p in model.parameters():
                p.add_(1e-3)
            averager.collect((index + 1) * config.every)
    averager.num_collected  # noqa: B018 - joins the worker
    return averager


def _swap_restore_ratios(model: nn.Module, repeats: int) -> None:
    params = [p.detach() for p in model.parameters()]
    copies = [torch.empty_like(p) for p in params]

    def one_copy() -> None:
        torch._foreach_copy_(copies, params)

    print("\n(b) prepare_for_eval (swap) + restore / one copy of the parameters — 25M MLP")
    print(f"    ({sum(p.numel() for p in params) / 1e6:.1f}M parameters, fp32)")
    for mode in ("lawa", "ema"):
        for placement in ("device", "host", "sharded"):
            config = AveragingConfig(
                mode=mode, every=EVERY, window=WINDOW, beta=BETA, placement=placement
            )
            averager = _filled_averager(model, config, collections=3)

            def swap_and_restore(averager: TorchAverager = averager) -> None:
                averager.swap_in_average()
                averager.restore_live()

            ratio, swap_time, copy_time = _paired(swap_and_restore, one_copy, repeats)
            print(
                f"    {mode}/{placement:8s} {ratio:6.2f}   (goal <= 3)   "
                f"{1e3 * swap_time:.1f} ms / {1e3 * copy_time:.1f} ms"
            )
            del averager


# -- (c) EMA update against other libraries ------------------------------------------------


def _ema_rivals(model: nn.Module) -> dict[str, Callable[[], None] | str]:
    """Each rival's per-step update at β = 0.9, or why it is skipped."""
    rivals: dict[str, Callable[[], None] | str] = {}
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(BETA), use_buffers=False)
    rivals["torch AveragedModel (ema multi_avg_fn)"] = lambda: averaged.update_parameters(model)
    try:
        from timm.utils import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=BETA, foreach=True)
        rivals["timm ModelEmaV3"] = lambda: timm_ema.update(model)
    except Exception as error:  # timm imports torchvision, which may not match torch
        rivals["timm ModelEmaV3"] = (
            f"skipped: timm does not import ({type(error).__name__}: {error})"
        )
    try:
        from ema_pytorch import EMA

        # min_value = beta holds the decay at β from the first update on.
        ema_pytorch = EMA(
            model, beta=BETA, min_value=BETA, update_after_step=0, update_every=1,
            include_online_model=False, use_foreach=True,
        )  # fmt: skip
        rivals["ema_pytorch EMA"] = ema_pytorch.update
    except Exception as error:
        rivals["ema_pytorch EMA"] = f"skipped: ema_pytorch does not import ({error})"
    return rivals


def _ema_update_ratios(model: nn.Module, workload: BigMLPWorkload, repeats: int) -> None:
    config = AveragingConfig(mode="ema", every=1, beta=BETA)
    ours = _filled_averager(model, config, collections=1)
    step = iter(range(2, 10**9))

    def ours_device() -> None:
        ours.collect(next(step))

    # Host placement: what collect() costs the step path with a training step
    # between updates (its fold runs on a worker, overlapping that step).
    host_model = copy.deepcopy(model)
    host = TorchAverager(dataclasses.replace(config, placement="host"), host_model)
    optimizer = torch.optim.SGD(host_model.parameters(), lr=1e-6)
    batches = workload.batches()
    samples = []
    for index in range(repeats + 1):
        batch = next(batches)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(host_model(batch["inputs"]), batch["targets"])
        loss.backward()
        optimizer.step()
        start = time.perf_counter()
        host.collect(index + 1)
        samples.append(time.perf_counter() - start)
    ours_host = statistics.median(samples[1:])

    print("\n(c) polyak EMA update / rival EMA update, β = 0.9 every step — 25M MLP")
    print("    device: polyak's full update (finiteness check + fused lerp), paired with the rival")
    print(f"    host: polyak's step-path wait ({1e3 * ours_host:.2f} ms) / the rival's median")
    for name, update in _ema_rivals(model).items():
        if isinstance(update, str):
            print(f"    vs {name}: {update}")
            continue
        ratio, ours_time, rival_time = _paired(ours_device, update, repeats)
        print(
            f"    vs {name:40s} device {ratio:6.3f}   host {ours_host / rival_time:6.3f}   "
            f"({1e3 * ours_time:.1f} ms vs {1e3 * rival_time:.1f} ms; goal <= 1.0)"
        )


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(0)
    optimizer_name = "polyak NadamW"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; optimizer: {optimizer_name}"
    )
    big = BigMLPWorkload(FLAGS.width, FLAGS.big_batch)
    if "a" in FLAGS.parts:
        digits = _digits()
        if digits is None:
            print("\n(a) embedded workload: polyak.workloads is not importable; skipped")
        else:
            _step_time_ratios("embedded digits workload", *digits, rounds=FLAGS.rounds)
        _step_time_ratios(
            f"{sum(p.numel() for p in BigMLP(FLAGS.width).parameters()) / 1e6:.1f}M-parameter "
            f"MLP, batch {FLAGS.big_batch}",
            big,
            big.batches,
            rounds=FLAGS.big_rounds,
            block=16,
        )
    model, _ = big.init_model_fn(0)
    if "b" in FLAGS.parts:
        _swap_restore_ratios(model, FLAGS.repeats)
    if "c" in FLAGS.parts:
        _ema_update_ratios(model, big, FLAGS.repeats)


if __name__ == "__main__":
    app.run(main)
