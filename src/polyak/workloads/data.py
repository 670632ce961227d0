"""The data behind the embedded workloads: loading, checking, splitting, batching.

Both datasets ship inside scikit-learn, so nothing is downloaded. Every load
is checked: the array shapes must match what the workloads were calibrated
on, and a SHA-256 fingerprint of the raw arrays is computed and compared with
the recorded one, so a result can always say which data produced it.

The fingerprint is ``sha256(X.astype('<f8').tobytes() + y.astype('<f8').tobytes())``
over the raw arrays as scikit-learn returns them (C order, float64
little-endian), before any split or standardization.

Splits are a fixed permutation (seed :data:`SPLIT_SEED`), and standardization
uses training statistics only. The batch iterators here are pure numpy; the
torch and jax workloads only convert what they yield.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import numpy as np

from polyak.workloads.prng import rng_words

SPLIT_SEED = 0

#: Smallest per-feature standard deviation used for scaling. Some digit pixels
#: are always 0 in the training split; they are centred but left unscaled.
_MIN_STDDEV = 1e-8


class DatasetMismatchError(ValueError):
    """The bundled data differs from what the embedded workloads were built on."""


@dataclasses.dataclass(frozen=True)
class DatasetFingerprint:
    """Which data a run used: enough to reproduce or refuse a comparison."""

    name: str
    source: str
    n_examples: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a bundled dataset must look like, and how it is split."""

    name: str
    source: str
    n_examples: int
    n_features: int
    expected_sha256: str
    num_validation: int
    num_test: int
    standardize_targets: bool

    @property
    def num_train(self) -> int:
        return self.n_examples - self.num_validation - self.num_test


DATASET_SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        name="digits",
        source="sklearn.datasets.load_digits",
        n_examples=1797,
        n_features=64,
        expected_sha256="f19a7d92591ca0a1ffc65ec172e8149afdff995e0d2c4cb0afd151f38471ff90",
        num_validation=300,
        num_test=300,
        standardize_targets=False,
    ),
    "diabetes": DatasetSpec(
        name="diabetes",
        source="sklearn.datasets.load_diabetes(scaled=False)",
        n_examples=442,
        n_features=10,
        expected_sha256="e9c1f7559552854a24dc45b41c446ce5f79f96e5da081bcce24b57492720b3f7",
        num_validation=88,
        num_test=88,
        standardize_targets=True,
    ),
}


def _spec_for(name: str) -> DatasetSpec:
    try:
        return DATASET_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown embedded dataset {name!r}; expected one of {sorted(DATASET_SPECS)}"
        ) from None


def _load_raw_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays exactly as scikit-learn ships them."""
    from sklearn import datasets

    if name == "digits":
        inputs, targets = datasets.load_digits(return_X_y=True)
    elif name == "diabetes":
        inputs, targets = datasets.load_diabetes(return_X_y=True, scaled=False)
    else:
        _spec_for(name)
        raise AssertionError("unreachable")
    return np.asarray(inputs), np.asarray(targets)


def sha256_of_arrays(inputs: np.ndarray, targets: np.ndarray) -> str:
    """SHA-256 of both arrays as C-ordered little-endian float64 bytes."""
    digest = hashlib.sha256()
    for array in (inputs, targets):
        digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class RawDataset:
    inputs: np.ndarray
    targets: np.ndarray
    fingerprint: DatasetFingerprint


def load_raw_dataset(name: str) -> RawDataset:
    """Loads and checks one bundled dataset (shape, count and fingerprint)."""
    spec = _spec_for(name)
    inputs, targets = _load_raw_arrays(name)
    expected_shape = (spec.n_examples, spec.n_features)
    if inputs.shape != expected_shape or targets.shape != (spec.n_examples,):
        raise DatasetMismatchError(
            f"dataset {name!r} from {spec.source} has inputs {inputs.shape} and targets "
            f"{targets.shape}; expected inputs {expected_shape} and targets "
            f"({spec.n_examples},). The embedded workloads were calibrated on that count."
        )
    sha256 = sha256_of_arrays(inputs, targets)
    if sha256 != spec.expected_sha256:
        raise DatasetMismatchError(
            f"dataset {name!r} from {spec.source} has SHA-256 {sha256}; expected "
            f"{spec.expected_sha256}. The bundled data changed, so targets calibrated on "
            "the recorded data no longer apply."
        )
    fingerprint = DatasetFingerprint(
        name=name, source=spec.source, n_examples=spec.n_examples, sha256=sha256
    )
    return RawDataset(inputs=inputs, targets=targets, fingerprint=fingerprint)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split, ready to batch: float32 inputs and the model's target dtype."""

    inputs: np.ndarray
    targets: np.ndarray
    indices: np.ndarray  # rows of the raw dataset, for checking disjointness

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


class ThreeSplits:
    """AlgoPerf's split names over a data set's ``train``, ``validation`` and ``test``."""

    train: Split
    validation: Split
    test: Split

    def split(self, split: str) -> Split:
        if split in ("train", "eval_train"):
            return self.train
        if split == "validation":
            return self.validation
        if split == "test":
            return self.test
        raise ValueError(
            f"unknown split {split!r}; expected one of train, eval_train, validation, test"
        )


@dataclasses.dataclass(frozen=True)
class PreparedDataset(ThreeSplits):
    train: Split
    validation: Split
    test: Split
    input_mean: np.ndarray
    input_stddev: np.ndarray
    target_mean: float
    target_stddev: float
    fingerprint: DatasetFingerprint


def split_indices(n_examples: int, num_validation: int, num_test: int) -> dict[str, np.ndarray]:
    """A fixed permutation cut into train / validation / test row indices."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n_examples)
    num_train = n_examples - num_validation - num_test
    return {
        "train": np.sort(order[:num_train]),
        "validation": np.sort(order[num_train : num_train + num_validation]),
        "test": np.sort(order[num_train + num_validation :]),
    }


@functools.cache
def prepare_dataset(name: str) -> PreparedDataset:
    """Splits and standardizes a dataset with training statistics only (cached)."""
    spec = _spec_for(name)
    raw = load_raw_dataset(name)
    rows = split_indices(spec.n_examples, spec.num_validation, spec.num_test)
    train_inputs = raw.inputs[rows["train"]]
    input_mean = train_inputs.mean(axis=0)
    input_stddev = train_inputs.std(axis=0)
    input_stddev = np.where(input_stddev < _MIN_STDDEV, 1.0, input_stddev)
    if spec.standardize_targets:
        train_targets = raw.targets[rows["train"]]
        target_mean = float(train_targets.mean())
        target_stddev = float(train_targets.std())
    else:
        target_mean, target_stddev = 0.0, 1.0

    def make_split(split: str) -> Split:
        index = rows[split]
        inputs = ((raw.inputs[index] - input_mean) / input_stddev).astype(np.float32)
        if spec.standardize_targets:
            targets = ((raw.targets[index] - target_mean) / target_stddev).astype(np.float32)
        else:
            targets = raw.targets[index].astype(np.int32)
        for array in (inputs, targets):
            array.setflags(write=False)
        return Split(inputs=inputs, targets=targets, indices=index)

    return PreparedDataset(
        train=make_split("train"),
        validation=make_split("validation"),
        test=make_split("test"),
        input_mean=input_mean,
        input_stddev=input_stddev,
        target_mean=target_mean,
        target_stddev=target_stddev,
        fingerprint=raw.fingerprint,
    )


class TrainBatches:
    """Infinite training batches: a fresh permutation per epoch, drawn from ``data_rng``.

    Epochs are concatenated, so a batch may straddle two epochs and no example
    is dropped. :meth:`fast_forward` skips batches without materializing
    them, which is how a resumed run finds its place in the stream.
    """

    def __init__(self, split: Split, global_batch_size: int, data_rng: Any) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size!r} must be >= 1")
        self._split = split
        self._batch_size = int(global_batch_size)
        self._rng = np.random.default_rng(rng_words(data_rng))
        self._order = np.empty(0, dtype=np.int64)
        self._position = 0
        self.batches_drawn = 0

    def _next_indices(self) -> np.ndarray:
        chunks = []
        needed = self._batch_size
        while needed > 0:
            if self._position >= self._order.size:
                self._order = self._rng.permutation(len(self._split))
                self._position = 0
            take = min(needed, self._order.size - self._position)
            chunks.append(self._order[self._position : self._position + take])
            self._position += take
            needed -= take
        self.batches_drawn += 1
        return np.concatenate(chunks)

    def fast_forward(self, num_batches: int) -> None:
        for _ in range(num_batches):
            self._next_indices()

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        index = self._next_indices()
        return {"inputs": self._split.inputs[index], "targets": self._split.targets[index]}


def eval_batches(split: Split, num_examples: int, global_batch_size: int) -> list[dict[str, Any]]:
    """The first ``num_examples`` of a split in order, the last batch padded.

    Every batch has exactly ``global_batch_size`` rows; padded rows repeat zeros
    and carry ``weights == 0``, as AlgoPerf's ``shard_and_maybe_pad_np`` does.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r} must be >= 1")
    if not 0 < num_examples <= len(split):
        raise ValueError(f"num_examples={num_examples!r} must lie in [1, {len(split)}]")
    batches = []
    for start in range(0, num_examples, global_batch_size):
        stop = min(start + global_batch_size, num_examples)
        size = stop - start
        pad = global_batch_size - size
        inputs = split.inputs[start:stop]
        targets = split.targets[start:stop]
        weights = np.ones(size, dtype=np.float32)
        if pad:
            inputs = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)])
            targets = np.concatenate([targets, np.zeros((pad, *targets.shape[1:]), targets.dtype)])
            weights = np.concatenate([weights, np.zeros(pad, dtype=np.float32)])
        batches.append({"inputs": inputs, "targets": targets, "weights": weights})
    return batches
