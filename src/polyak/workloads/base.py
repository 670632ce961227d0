"""What the embedded workloads share, whatever the framework or dataset.

:class:`EmbeddedWorkload` implements the framework-free part of AlgoPerf's
``Workload`` interface for a small bundled dataset: split sizes, targets and
their direction, budgets, the dataset fingerprint, the input queues (numpy
first, converted by the framework twin), the forward-pass contract of
``model_fn``, the loss and eval metrics (written once over a few array
operations each twin supplies) and the evaluation loop over the
``eval_train`` / ``validation`` / ``test`` splits.

A concrete workload is three layers, each written once:
``digits.BaseDigitsWorkload`` (data, model shape, targets, budgets: a table
of class settings), then ``common_torch.TorchEmbeddedWorkload`` or
``common_jax.JaxEmbeddedWorkload`` (model, array operations, batches for one
framework), joined in ``digits_torch.py`` etc. ``textlm`` brings its own
data (``_data``, ``_train_batches``) and, per twin, its own model
(``_build_model``); everything else it shares.
"""

from __future__ import annotations

import abc
import math
import operator
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
from polyak.workloads.input_queue import InputQueue

EVAL_SPLITS = ("eval_train", "validation", "test")

# Parameter leaves that scale rather than shift: torch names both kinds
# "weight"; flax names them "kernel" (Dense) and "scale" (BatchNorm, LayerNorm).
_SCALING_LEAVES = ("weight", "kernel", "scale")
_EMBEDDINGS = ("token_embedding", "position_embedding")


def parameter_type(path: tuple[str, ...]) -> spec.ParameterType:
    """AlgoPerf's type for the parameter at ``path`` (module names, then the leaf).

    Every model here, in either framework, names its modules by these rules:
    ``bn*`` is BatchNorm, ``ln*`` and ``final_norm`` LayerNorm, ``qkv`` and
    ``attn_out`` attention, ``token_embedding`` / ``position_embedding`` are
    embedding tables.
    """
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    scales = leaf in _SCALING_LEAVES
    if module in _EMBEDDINGS or leaf in _EMBEDDINGS:
        return spec.ParameterType.EMBEDDING
    if module.startswith("bn"):
        return spec.ParameterType.BATCH_NORM_SCALE if scales else spec.ParameterType.BATCH_NORM_BIAS
    if module.startswith("ln") or module == "final_norm":
        return spec.ParameterType.LAYER_NORM_SCALE if scales else spec.ParameterType.LAYER_NORM_BIAS
    if module == "qkv":
        return spec.ParameterType.ATTENTION_QKV if scales else spec.ParameterType.ATTENTION_BIAS
    if module == "attn_out" and scales:
        return spec.ParameterType.ATTENTION_OUT
    return spec.ParameterType.WEIGHT if scales else spec.ParameterType.BIAS


def _class_setting(attribute: str, doc: str | None = None) -> Any:
    """A read-only property for a value each workload sets as a class attribute."""
    return property(operator.attrgetter(attribute), doc=doc)


class EmbeddedWorkload(spec.Workload):
    """A small CPU workload on bundled data, with AlgoPerf's Workload interface.

    Subclasses set the class attributes below (the dataset base per workload)
    and the framework hooks (the twin per framework).
    """

    # Set by the per-workload base (digits.py, diabetes.py, textlm.py).
    workload_name: str = ""
    dataset_name: str = ""
    hidden_widths: tuple[int, ...] = ()
    num_outputs: int = 1
    use_batch_norm: bool = False
    _loss_type: spec.LossType  # no default: each workload names its loss
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
    #: Inputs are token ids (integers) rather than real-valued features.
    _token_inputs: bool = False
    #: The model predicts every position of its input (logits ``[batch,
    #: positions, classes]``): an example's loss is the mean over its
    #: positions, and the loss is the only metric.
    _predicts_every_position: bool = False

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

    loss_type = _class_setting("_loss_type")
    target_metric_name = _class_setting("_target_metric")
    validation_target_value = _class_setting("_validation_target")
    test_target_value = _class_setting("_test_target")
    step_hint = _class_setting("_step_hint")
    max_allowed_runtime_sec = _class_setting("_max_allowed_runtime_sec")
    eval_period_time_sec = _class_setting("_eval_period_time_sec")
    eval_period_steps = _class_setting(
        "_eval_period_steps", "Steps between evals in the local loop (which counts steps)."
    )
    eval_batch_size = _class_setting("_eval_batch_size")
    recommended_batch_size = _class_setting(
        "_recommended_batch_size", "The global batch size the targets were calibrated with."
    )

    @property
    def target_direction(self) -> str:
        """``"max"`` when higher is better (accuracy), ``"min"`` for loss-like metrics."""
        return "max" if self._higher_is_better else "min"

    def _beats(self, value: float, target: float) -> bool:
        # AlgoPerf compares strictly: > for accuracy-like, < for loss-like metrics.
        return value > target if self._higher_is_better else value < target

    def has_reached_validation_target(self, eval_result: dict[str, float]) -> bool:
        return self._beats(
            eval_result[f"validation/{self.target_metric_name}"], self.validation_target_value
        )

    def has_reached_test_target(self, eval_result: dict[str, float]) -> bool:
        return self._beats(eval_result[f"test/{self.target_metric_name}"], self.test_target_value)

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
            numpy_batches: Any = self._train_batches(data_rng, global_batch_size)
        else:
            num_examples = self._num_examples_for(split)
            one_pass = eval_batches(self._data.split(split), num_examples, global_batch_size)
            numpy_batches = _cycle(one_pass, repeat=repeat_final_dataset is not False)
        return InputQueue(numpy_batches, self._to_framework_batch, num_batches)

    def _train_batches(
        self, data_rng: spec.RandomState, global_batch_size: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless numpy training batches: the training split, reshuffled every epoch."""
        return TrainBatches(self._data.train, global_batch_size, data_rng)

    def _num_examples_for(self, split: str) -> int:
        sizes = {
            "eval_train": self.num_eval_train_examples,
            "validation": self.num_validation_examples,
            "test": self.num_test_examples,
        }
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; expected train or one of {EVAL_SPLITS}")
        return sizes[split]

    # ---- model ------------------------------------------------------------------

    def model_fn(
        self,
        params: spec.ParameterContainer,
        augmented_and_preprocessed_input_batch: dict[str, spec.Tensor],
        model_state: spec.ModelAuxiliaryState,
        mode: spec.ForwardPassMode,
        rng: spec.RandomState,
        update_batch_norm: bool,
        dropout_rate: float = 0.0,
    ) -> tuple[spec.Tensor, spec.ModelAuxiliaryState]:
        """Logits and the model state after one forward pass (AlgoPerf's signature)."""
        train = mode == spec.ForwardPassMode.TRAIN
        if not train and update_batch_norm:
            raise ValueError("update_batch_norm=True is not allowed in EVAL mode")
        inputs = augmented_and_preprocessed_input_batch["inputs"]
        return self._forward(
            params, inputs, model_state, train, rng, update_batch_norm, dropout_rate
        )

    @abc.abstractmethod
    def _forward(
        self,
        params: spec.ParameterContainer,
        inputs: spec.Tensor,
        model_state: spec.ModelAuxiliaryState,
        train: bool,
        rng: spec.RandomState,
        update_batch_norm: bool,
        dropout_rate: float,
    ) -> tuple[spec.Tensor, spec.ModelAuxiliaryState]:
        """The framework's forward pass, for a mode already checked by ``model_fn``."""

    # ---- loss and metrics -------------------------------------------------------

    def loss_fn(
        self,
        label_batch: spec.Tensor,
        logits_batch: spec.Tensor,
        mask_batch: spec.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> dict[str, spec.Tensor]:
        """Per-example losses, their (masked) sum and the number of valid examples.

        Softmax cross-entropy smooths labels as ``(1-α)·onehot + α/K``; mean
        squared error sums over outputs and ignores ``label_smoothing``. A
        model that predicts every position scores an example by the mean over
        its positions.
        """
        if self.loss_type == spec.LossType.SOFTMAX_CROSS_ENTROPY:
            per_example = self._softmax_cross_entropy(label_batch, logits_batch, label_smoothing)
        else:
            per_example = self._squared_error(label_batch, logits_batch)
        if self._predicts_every_position:
            per_example = per_example.mean(1)
        if mask_batch is None:
            n_valid = self._scalar_like(per_example.shape[0], per_example)
        else:
            mask = self._cast(mask_batch, per_example.dtype)
            per_example = per_example * mask
            n_valid = mask.sum()
        return {
            "summed": per_example.sum(),
            "n_valid_examples": n_valid,
            "per_example": per_example,
        }

    def _summed_metrics(
        self, logits: spec.Tensor, targets: spec.Tensor, weights: spec.Tensor
    ) -> dict[str, spec.Tensor]:
        summed_loss = self.loss_fn(targets, logits, weights)["summed"]
        if self._predicts_every_position:
            return {"loss": summed_loss}
        if self.loss_type == spec.LossType.SOFTMAX_CROSS_ENTROPY:
            correct = self._cast(self._argmax(logits) == targets, weights.dtype)
            return {"accuracy": (correct * weights).sum(), "loss": summed_loss}
        return {"mse": summed_loss, "loss": summed_loss}

    def _summed_eval_metrics(
        self, params: Any, model_state: Any, batch: dict[str, Any]
    ) -> dict[str, spec.Tensor]:
        """Summed metrics of one padded eval batch on this device or rank."""
        logits, _ = self.model_fn(
            params, batch, model_state, spec.ForwardPassMode.EVAL, None, update_batch_norm=False
        )
        return self._summed_metrics(logits, batch["targets"], batch["weights"])

    # The few array operations the loss and metrics above need from a framework.

    @abc.abstractmethod
    def _softmax_cross_entropy(
        self, labels: spec.Tensor, logits: spec.Tensor, label_smoothing: float
    ) -> spec.Tensor:
        """Cross-entropy of each prediction (per example, or per position of a
        sequence) against integer labels smoothed by ``label_smoothing``."""

    @abc.abstractmethod
    def _squared_error(self, labels: spec.Tensor, logits: spec.Tensor) -> spec.Tensor:
        """Per-example squared error, summed over outputs."""

    @abc.abstractmethod
    def _argmax(self, logits: spec.Tensor) -> spec.Tensor:
        """The predicted class of each example."""

    @abc.abstractmethod
    def _cast(self, array: spec.Tensor, dtype: Any) -> spec.Tensor:
        """``array`` converted to ``dtype``."""

    @abc.abstractmethod
    def _scalar_like(self, value: float, like: spec.Tensor) -> spec.Tensor:
        """A 0-d array holding ``value`` with the dtype (and device) of ``like``."""

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
