"""What the embedded workloads share, whatever the framework or dataset.

:class:`EmbeddedWorkload` implements the framework-free part of AlgoPerf's
``Workload`` interface for a small bundled dataset: split sizes, targets and
their direction, budgets, the dataset fingerprint, the input queues (numpy
first, converted by the framework twin) and the evaluation loop over the
``eval_train`` / ``validation`` / ``test`` splits.

A concrete workload is three layers, each written once:
``digits.BaseDigitsWorkload`` (data, model shape, targets, budgets), then
``torch_common.TorchEmbeddedWorkload`` or ``jax_common.JaxEmbeddedWorkload``
(model, loss, batches for one framework), joined in ``digits_torch.py`` etc.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from polyak.algoperf import spec
from polyak.workloads.data import (
    DATASET_SPECS,
    DatasetFingerprint,
    PreparedDataset,
    TrainBatches,
    eval_batches,
    prepare_dataset,
)

EVAL_SPLITS = ("eval_train", "validation", "test")


class EmbeddedWorkload(spec.Workload):
    """A small CPU workload on bundled data, with AlgoPerf's Workload interface.

    Subclasses set the class attributes below (the dataset base per workload)
    and the framework hooks (the twin per framework).
    """

    # Set by the per-workload base (digits.py, diabetes.py).
    workload_name: str = ""
    dataset_name: str = ""
    hidden_widths: tuple[int, ...] = ()
    num_outputs: int = 1
    use_batch_norm: bool = False
    _target_metric: str = ""
    _higher_is_better: bool = True
    _validation_target: float = math.nan
    _test_target: float = math.nan
    _step_hint: int = 0
    _max_allowed_runtime_sec: int = 0
    _eval_period_steps: int = 0
    _eval_period_time_sec: int = 0
    _eval_batch_size: int = 0
    _recommended_batch_size: int = 0

    # Set by the framework twin.
    framework: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._eval_batch_cache: dict[tuple[str, int, int], list[Any]] = {}

    # ---- data ---------------------------------------------------------------

    @property
    def _data(self) -> PreparedDataset:
        return prepare_dataset(self.dataset_name)

    @property
    def dataset_fingerprint(self) -> DatasetFingerprint:
        """Which data this workload trains and evaluates on (checked at load)."""
        return self._data.fingerprint

    @property
    def dataset_source(self) -> str:
        return self.dataset_fingerprint.source

    @property
    def dataset_num_examples(self) -> int:
        return self.dataset_fingerprint.n_examples

    @property
    def dataset_sha256(self) -> str:
        return self.dataset_fingerprint.sha256

    @property
    def num_train_examples(self) -> int:
        return DATASET_SPECS[self.dataset_name].num_train

    @property
    def num_eval_train_examples(self) -> int:
        # The training split is small, so the whole of it is evaluated.
        return self.num_train_examples

    @property
    def num_validation_examples(self) -> int:
        return DATASET_SPECS[self.dataset_name].num_validation

    @property
    def num_test_examples(self) -> int:
        return DATASET_SPECS[self.dataset_name].num_test

    @property
    def train_mean(self) -> tuple[float, ...]:
        """Per-feature means of the raw training inputs (already subtracted)."""
        return tuple(float(x) for x in self._data.input_mean)

    @property
    def train_stddev(self) -> tuple[float, ...]:
        """Per-feature scales of the raw training inputs (already divided out)."""
        return tuple(float(x) for x in self._data.input_stddev)

    @property
    def num_features(self) -> int:
        return DATASET_SPECS[self.dataset_name].n_features

    # ---- targets and budgets --------------------------------------------------

    @property
    def target_metric_name(self) -> str:
        return self._target_metric

    @property
    def target_direction(self) -> str:
        """``"max"`` when higher is better (accuracy), ``"min"`` for loss-like metrics."""
        return "max" if self._higher_is_better else "min"

    @property
    def validation_target_value(self) -> float:
        return self._validation_target

    @property
    def test_target_value(self) -> float:
        return self._test_target

    def _beats(self, value: float, target: float) -> bool:
        # AlgoPerf compares strictly: > for accuracy-like, < for loss-like metrics.
        return value > target if self._higher_is_better else value < target

    def has_reached_validation_target(self, eval_result: dict[str, float]) -> bool:
        return self._beats(
            eval_result[f"validation/{self.target_metric_name}"], self.validation_target_value
        )

    def has_reached_test_target(self, eval_result: dict[str, float]) -> bool:
        return self._beats(eval_result[f"test/{self.target_metric_name}"], self.test_target_value)

    @property
    def step_hint(self) -> int:
        return self._step_hint

    @property
    def max_allowed_runtime_sec(self) -> int:
        return self._max_allowed_runtime_sec

    @property
    def eval_period_time_sec(self) -> int:
        return self._eval_period_time_sec

    @property
    def eval_period_steps(self) -> int:
        """Steps between evals in the local loop (which counts steps, not seconds)."""
        return self._eval_period_steps

    @property
    def eval_batch_size(self) -> int:
        return self._eval_batch_size

    @property
    def recommended_batch_size(self) -> int:
        """The global batch size the targets were calibrated with."""
        return self._recommended_batch_size

    # ---- input queues ---------------------------------------------------------

    @abc.abstractmethod
    def _to_framework_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Converts one global numpy batch for the framework (tensors, sharding)."""

    def _build_input_queue(
        self,
        data_rng: spec.RandomState,
        split: str,
        data_dir: str | None,
        global_batch_size: int,
        cache: bool | None = None,
        repeat_final_dataset: bool | None = None,
        num_batches: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Training batches are shuffled per epoch from ``data_rng`` and never end.

        Eval splits come in order, padded with ``weights``, and repeat unless
        ``repeat_final_dataset`` is False. ``data_dir`` is ignored: the data
        ships with scikit-learn.
        """
        del data_dir, cache
        if split == "train":
            numpy_batches: Any = TrainBatches(self._data.train, global_batch_size, data_rng)
        else:
            num_examples = self._num_examples_for(split)
            one_pass = eval_batches(self._data.split(split), num_examples, global_batch_size)
            numpy_batches = _cycle(one_pass, repeat=repeat_final_dataset is not False)
        return InputQueue(numpy_batches, self._to_framework_batch, num_batches)

    def _num_examples_for(self, split: str) -> int:
        sizes = {
            "eval_train": self.num_eval_train_examples,
            "validation": self.num_validation_examples,
            "test": self.num_test_examples,
        }
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; expected train or one of {EVAL_SPLITS}")
        return sizes[split]

    # ---- evaluation -----------------------------------------------------------

    @abc.abstractmethod
    def _eval_batch_sums(
        self, params: Any, batch: dict[str, Any], model_state: Any
    ) -> dict[str, float]:
        """Summed (not averaged) metrics over one padded eval batch, all devices/ranks."""

    def _eval_model_on_split(
        self,
        split: str,
        num_examples: int,
        global_batch_size: int,
        params: spec.ParameterContainer,
        model_state: spec.ModelAuxiliaryState,
        rng: spec.RandomState,
        data_dir: str | None,
        global_step: int = 0,
    ) -> dict[str, float]:
        del rng, data_dir, global_step
        key = (split, num_examples, global_batch_size)
        if key not in self._eval_batch_cache:
            one_pass = eval_batches(self._data.split(split), num_examples, global_batch_size)
            self._eval_batch_cache[key] = [self._to_framework_batch(b) for b in one_pass]
        totals: dict[str, float] = {}
        for batch in self._eval_batch_cache[key]:
            for name, value in self._eval_batch_sums(params, batch, model_state).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return {name: total / num_examples for name, total in totals.items()}

    def eval_model(
        self,
        global_batch_size: int,
        params: spec.ParameterContainer,
        model_state: spec.ModelAuxiliaryState,
        rng: spec.RandomState,
        data_dir: str | None,
        imagenet_v2_data_dir: str | None,
        global_step: int,
    ) -> dict[str, float]:
        """AlgoPerf's full evaluation: train/, validation/ and test/ metrics with counts."""
        del imagenet_v2_data_dir
        results: dict[str, float] = {}
        for split in EVAL_SPLITS:
            num_examples = self._num_examples_for(split)
            metrics = self._eval_model_on_split(
                split,
                num_examples=num_examples,
                global_batch_size=global_batch_size,
                params=params,
                model_state=model_state,
                rng=rng,
                data_dir=data_dir,
                global_step=global_step,
            )
            prefix = "train" if split == "eval_train" else split
            for name, value in metrics.items():
                results[f"{prefix}/{name}"] = value
            if split != "eval_train":
                results[f"{prefix}/num_examples"] = num_examples
        return results


def _cycle(batches: list[dict[str, np.ndarray]], repeat: bool) -> Iterator[dict[str, np.ndarray]]:
    while True:
        yield from batches
        if not repeat:
            return


class InputQueue:
    """An iterator of framework batches over numpy batches, converted on demand.

    ``fast_forward(n)`` skips ``n`` batches at the numpy level (no tensors, no
    device transfers); a resumed run uses it to continue the same stream.
    ``batches_drawn`` counts every batch taken or skipped.
    """

    def __init__(
        self, numpy_batches: Iterator[dict[str, np.ndarray]], convert: Any, limit: int | None
    ) -> None:
        self._numpy_batches = numpy_batches
        self._convert = convert
        self._limit = limit
        self.batches_drawn = 0

    def fast_forward(self, num_batches: int) -> None:
        if isinstance(self._numpy_batches, TrainBatches):
            self._numpy_batches.fast_forward(num_batches)
        else:
            for _ in range(num_batches):
                next(self._numpy_batches)
        self.batches_drawn += num_batches

    def __iter__(self) -> InputQueue:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._limit is not None and self.batches_drawn >= self._limit:
            raise StopIteration
        batch = next(self._numpy_batches)
        self.batches_drawn += 1
        return self._convert(batch)
