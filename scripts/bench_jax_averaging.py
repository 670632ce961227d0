"""Per-step time of the JAX NadamW submission with and without averaging.

Side by side in one process: every setting trains the same embedded workload
from the same start, in interleaved rounds, and the script prints the median
milliseconds per step and the ratio to no averaging. Collections are made
frequent (ν = 8) so that the averaging cost shows if there is any, and at
ν = 64 for the common case.

  python scripts/bench_jax_averaging.py --workload=digits --steps=200 --rounds=15
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
from absl import app, flags

from polyak.optim.nadamw_config import NadamWConfig
from polyak.runner.submission_loader import load_submission_module
from polyak.workloads.registry import make_workload

flags.DEFINE_string("workload", "digits", "Embedded workload.")
flags.DEFINE_integer("steps", 200, "Timed steps per round (after a compile/warm-up round).")
flags.DEFINE_integer("rounds", 15, "Interleaved rounds per setting.")
FLAGS = flags.FLAGS

REPO = Path(__file__).resolve().parent.parent
BASE = dict(NadamWConfig.DEFAULT_HYPERPARAMETERS)
SETTINGS = {
    "none": {},
    "lawa device (nu=8, L=20)": {"averaging": "lawa", "averaging_every": 8, "lawa_window": 20},
    "ema device (nu=8, beta=0.9)": {"averaging": "ema", "averaging_every": 8, "ema_beta": 0.9},
    "lawa device (nu=64, L=20)": {"averaging": "lawa", "averaging_every": 64, "lawa_window": 20},
    "ema device (nu=64, beta=0.9)": {"averaging": "ema", "averaging_every": 64, "ema_beta": 0.9},
    "lawa host (nu=8, L=20)": {
        "averaging": "lawa",
        "averaging_every": 8,
        "lawa_window": 20,
        "averaging_placement": "host",
    },
}


def main(argv: list[str]) -> None:
    del argv
    submission = load_submission_module(REPO / "submissions/nadamw/jax/submission.py")
    workload = make_workload(FLAGS.workload, "jax")
    batch_size = submission.get_batch_size(FLAGS.workload)
    queue = workload._build_input_queue(jax.random.PRNGKey(0), "train", None, batch_size)
    batches = [next(queue) for _ in range(FLAGS.steps)]
    rng = jax.random.PRNGKey(1)
    runs = {}
    for name, extra in SETTINGS.items():
        hp = {**BASE, **extra}
        params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
        state = submission.init_optimizer_state(workload, params, model_state, hp, rng)
        runs[name] = [hp, params, model_state, state, 0]

    def one_round(name: str) -> float:
        hp, params, model_state, state, step = runs[name]
        start = time.perf_counter()
        for batch in batches:
            state, params, model_state = submission.update_params(
                workload, params, None, model_state, hp, batch, None, state, [], step, rng
            )
            step += 1
        jax.block_until_ready(params)
        elapsed = time.perf_counter() - start
        runs[name][1:] = [params, model_state, state, step]
        return 1000.0 * elapsed / len(batches)

    names = list(SETTINGS)
    for name in names:  # compile and warm up
        one_round(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(FLAGS.rounds):
        # A step is well under a millisecond: whichever setting runs first or last in
        # a round would carry the round's drift, so the order turns every round.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(one_round(name))
    print(
        f"jax {jax.__version__}, {len(jax.devices())} device(s), workload {FLAGS.workload}, "
        f"{FLAGS.steps} steps x {FLAGS.rounds} interleaved rounds"
    )
    print(f"{'setting':32s} {'median ms/step':>15s} {'ratio to none':>14s} {'paired ratio':>13s}")
    base = statistics.median(times["none"])
    for name, values in times.items():
        median = statistics.median(values)
        # Each round's time over the same round's run without averaging.
        paired = statistics.median(v / b for v, b in zip(values, times["none"]))
        print(f"{name:32s} {median:15.3f} {median / base:14.3f} {paired:13.3f}")


if __name__ == "__main__":
    app.run(main)
