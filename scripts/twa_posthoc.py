r"""Post-hoc TWA over saved checkpoints of an embedded workload (PyTorch).

Loads K checkpoints (torch ``state_dict`` files of the workload's model), fits
TWA's averaging coefficients on training batches only (TWA-t), and prints
validation metrics for the last checkpoint, uniform LAWA over the same
checkpoints, and TWA (one global coefficient vector, and layer-wise).

Checkpoints come from ``--checkpoint_dir`` (every ``*.pt`` file, ordered by the
number in its name), or are made first with ``--train_steps``: NadamW (the
hyperparameters of ``--search_space`` point ``--point``) trains the workload and
saves the model every ``--save_every`` steps.

Examples:

  python scripts/twa_posthoc.py --workload=digits --train_steps=300 --save_every=10 \
      --checkpoint_dir=/tmp/digits_checkpoints

  python scripts/twa_posthoc.py --workload=digits --checkpoint_dir=/tmp/digits_checkpoints \
      --window=20 --twa_steps=100 --twa_batches=16
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from absl import app, flags

from polyak.algoperf import spec
from polyak.algoperf.batch_sizes import get_batch_size
from polyak.averaging.twa_torch import TWAConfig, TWAResult, fit_twa
from polyak.files import atomic_write_bytes
from polyak.workloads import prng
from polyak.workloads.registry import EMBEDDED_WORKLOADS, make_workload

flags.DEFINE_enum("workload", "digits", list(EMBEDDED_WORKLOADS), "Embedded workload.")
flags.DEFINE_string("checkpoint_dir", None, "Directory of state_dict checkpoints (*.pt).")
flags.DEFINE_integer("train_steps", 0, "Train NadamW this many steps first (0: only read).")
flags.DEFINE_integer("save_every", 10, "With --train_steps: save the model every N steps.")
flags.DEFINE_integer("step_hint", None, "NadamW schedule length (default: the workload's).")
flags.DEFINE_string(
    "search_space", "tuning_search_spaces/nadamw.json", "NadamW hyperparameters (JSON list)."
)
flags.DEFINE_integer("point", 0, "Which point of --search_space to train with.")
flags.DEFINE_integer("window", 0, "Use the last N checkpoints (0: all of them).")
flags.DEFINE_integer("seed", 0, "Model init, training data order and TWA batches.")
flags.DEFINE_integer("twa_steps", 50, "Adam steps on the coefficients.")
flags.DEFINE_integer("twa_batches", 8, "Training batches TWA is fitted on.")
flags.DEFINE_float("twa_lr", 0.1, "Adam learning rate, in units of the checkpoints' spread.")
flags.DEFINE_integer("twa_layerwise", 2, "Tensors per block in the layer-wise row (2: a layer).")
FLAGS = flags.FLAGS

Batch = dict[str, torch.Tensor]


def _training_loss(workload: spec.Workload, label_smoothing: float = 0.0):
    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits, _ = workload.model_fn(
            model, batch, None, spec.ForwardPassMode.TRAIN, None, update_batch_norm=False
        )
        terms = workload.loss_fn(batch["targets"], logits, batch.get("weights"), label_smoothing)
        return terms["summed"] / terms["n_valid_examples"]

    return loss


def _batch_norm_forward(workload: spec.Workload):
    def forward(model: torch.nn.Module, batch: Batch) -> None:
        workload.model_fn(
            model, batch, None, spec.ForwardPassMode.TRAIN, None, update_batch_norm=True
        )

    return forward


def train_and_save(workload: spec.Workload, directory: Path) -> None:
    """Trains NadamW for --train_steps and saves ``step_<n>.pt`` every --save_every steps."""
    from polyak.optim.nadamw_config import NadamWConfig
    from polyak.optim.nadamw_torch import make_nadamw

    with open(FLAGS.search_space, encoding="utf-8") as file:
        hyperparameters = json.load(file)[FLAGS.point]
    step_hint = FLAGS.step_hint or workload.step_hint
    key = prng.prng_key(FLAGS.seed)
    data_rng, model_rng = prng.split(key, 2)
    model, _ = workload.init_model_fn(model_rng)
    optimizer, scheduler = make_nadamw(
        model.parameters(), NadamWConfig.from_hyperparameters(hyperparameters), step_hint
    )
    queue = workload._build_input_queue(
        data_rng, "train", None, get_batch_size(workload.workload_name)
    )
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("step_*.pt"):
        old.unlink()
    for step in range(1, FLAGS.train_steps + 1):
        batch = next(queue)
        optimizer.zero_grad(set_to_none=True)
        logits, _ = workload.model_fn(
            model,
            batch,
            None,
            spec.ForwardPassMode.TRAIN,
            None,
            update_batch_norm=True,
            dropout_rate=float(hyperparameters.get("dropout_rate", 0.0)),
        )
        terms = workload.loss_fn(
            batch["targets"], logits, None, float(hyperparameters.get("label_smoothing", 0.0))
        )
        (terms["summed"] / terms["n_valid_examples"]).backward()
        optimizer.step()
        scheduler.step()
        if step % FLAGS.save_every == 0:
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            atomic_write_bytes(directory / f"step_{step:06d}.pt", buffer.getvalue())
    print(
        f"trained {FLAGS.train_steps} NadamW steps (step_hint {step_hint}, point {FLAGS.point} "
        f"of {FLAGS.search_space}); saved every {FLAGS.save_every} to {directory}"
    )


def _checkpoint_files(directory: Path) -> list[Path]:
    def order(path: Path) -> tuple[int, str]:
        numbers = re.findall(r"\d+", path.stem)
        return (int(numbers[-1]) if numbers else -1, path.name)

    files = sorted(directory.glob("*.pt"), key=order)
    if not files:
        raise SystemExit(f"no *.pt checkpoints in {directory}")
    return files[-FLAGS.window :] if FLAGS.window > 0 else files


def _evaluate(workload: spec.Workload, model: torch.nn.Module) -> dict[str, float]:
    return workload.eval_model(workload.eval_batch_size, model, None, None, None, None, 0)


def _row(name: str, metrics: dict[str, float], metric: str, extra: str = "") -> str:
    return (
        f"{name:<28} {metrics[f'validation/{metric}']:>10.4f} {metrics['validation/loss']:>9.4f} "
        f"{metrics[f'test/{metric}']:>9.4f} {metrics['train/loss']:>10.4f}  {extra}"
    )


def main(argv: list[str]) -> int:
    del argv
    if not FLAGS.checkpoint_dir:
        raise app.UsageError("--checkpoint_dir is required")
    torch.manual_seed(FLAGS.seed)
    workload = make_workload(FLAGS.workload, "pytorch")
    directory = Path(FLAGS.checkpoint_dir)
    if FLAGS.train_steps > 0:
        train_and_save(workload, directory)
    files = _checkpoint_files(directory)
    states = [torch.load(path, map_location="cpu", weights_only=True) for path in files]

    model, _ = workload.init_model_fn(prng.prng_key(FLAGS.seed))
    names = [name for name, _ in model.named_parameters()]
    snapshots = [[state[name] for name in names] for state in states]
    metric = workload.target_metric_name

    # Training batches only (TWA-t): a stream of the training split of its own.
    queue = workload._build_input_queue(
        prng.fold_in(prng.prng_key(FLAGS.seed), 1),
        "train",
        None,
        get_batch_size(workload.workload_name),
    )
    batches = [next(queue) for _ in range(FLAGS.twa_batches)]
    loss_fn = _training_loss(workload)
    forward_fn = _batch_norm_forward(workload)

    print(
        f"{FLAGS.workload}: {len(files)} checkpoints ({files[0].name} .. {files[-1].name}); "
        f"TWA on {len(batches)} training batches, {FLAGS.twa_steps} steps, lr {FLAGS.twa_lr}"
    )
    header = f"{'weights':<28} {'val ' + metric:>10} {'val loss':>9} {'test ' + metric:>9}"
    print(f"{header} {'train loss':>10}  notes")

    def load_last() -> None:
        model.load_state_dict(states[-1])

    load_last()
    print(_row("last checkpoint", _evaluate(workload, model), metric))

    def run(name: str, config: TWAConfig) -> TWAResult:
        load_last()  # the live BatchNorm statistics are the last checkpoint's
        start = time.perf_counter()
        result = fit_twa(model, snapshots, config, loss_fn, batches, forward_fn=forward_fn)
        seconds = time.perf_counter() - start
        notes = f"fit {seconds:.2f}s"
        if result.uniform_loss is not None:
            notes += (
                f", fit-batch loss {result.uniform_loss:.4f} -> {result.fitted_loss:.4f}"
                f" ({result.chosen})"
            )
        print(_row(name, _evaluate(workload, model), metric, notes))
        return result

    common = dict(batches=FLAGS.twa_batches, lr=FLAGS.twa_lr)
    run("uniform LAWA (live BN)", TWAConfig(steps=0, recompute_batch_norm=False, **common))
    run("uniform LAWA (BN recomputed)", TWAConfig(steps=0, **common))
    global_result = run("TWA global", TWAConfig(steps=FLAGS.twa_steps, **common))
    layerwise = FLAGS.twa_layerwise
    layer_result = run(
        f"TWA layer-wise ({layerwise}/block)",
        TWAConfig(steps=FLAGS.twa_steps, layerwise=layerwise, **common),
    )
    _print_weights("TWA global", global_result)
    _print_weights("TWA layer-wise", layer_result)
    return 0


def _print_weights(name: str, result: TWAResult) -> None:
    weights = result.checkpoint_weights
    formatted: Callable[[Any], str] = lambda row: " ".join(f"{w:+.2f}" for w in row.tolist())
    print(f"{name}: weights over checkpoints (oldest first), {result.chosen}:")
    for index, row in enumerate(weights[:4]):
        print(f"  block {index}: {formatted(row)}")
    if len(weights) > 4:
        print(f"  ... {len(weights) - 4} more blocks")


if __name__ == "__main__":
    sys.exit(app.run(main))
