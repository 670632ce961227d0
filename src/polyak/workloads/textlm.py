"""The ``textlm`` workload, framework-free: a byte-level language model on Python's own docs.

AlgoPerf's language models train on random mini-batches of a large corpus,
so every step sees a noisy gradient, which is what weight averaging smooths
out. This workload brings that regime to a CPU: a small decoder-only
transformer predicts the next byte of text.

The corpus is ``pydoc_data.topics.topics``: the reference-manual topics that
``help()`` shows, shipped inside every standard CPython installation (so it
is on every machine where polyak installs, and nothing is downloaded). Each
topic is one document (79 documents, about 466 kB, on Python 3.11). Its text
differs between Python releases, so the corpus is fingerprinted
(:func:`corpus_fingerprint`) and checked against the calibration record: a
different text is a different data set, whose targets were never calibrated,
and it is refused (:class:`~polyak.workloads.data.DatasetMismatchError`)
rather than silently scored against them. Re-run
``scripts/calibrate_workloads.py --workloads=textlm`` on that Python to
calibrate it.

- Documents are split whole, with a fixed permutation (seed
  :data:`SPLIT_SEED`), into validation and test (each at least
  :data:`HELD_OUT_FRACTION` of the bytes) and train, so validation measures
  text the model never trained on, not held-out windows of training text.
- A split's documents are joined into one byte stream, each followed by
  :data:`END_OF_DOCUMENT` (a zero byte, which the text never contains).
- Training batches are windows of ``context_length + 1`` bytes at offsets
  drawn uniformly from the training stream with the run's data rng, a fresh
  draw every step (real mini-batch noise).
- Evaluation uses fixed windows, evenly spaced over each held-out stream
  (and over the training stream for ``eval_train``). An example is one
  window; its loss is the mean next-byte cross-entropy over its positions,
  so the metric ``loss`` is nats per byte (lower is better).

Targets and ``step_hint`` are calibrated (``calibration/textlm.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import platform
from collections.abc import Iterator
from typing import Any

import numpy as np

from polyak.algoperf import spec
from polyak.workloads.base import EmbeddedWorkload, InputQueue
from polyak.workloads.calibration import CalibratedValue, load_calibration
from polyak.workloads.data import DatasetFingerprint, DatasetMismatchError, Split
from polyak.workloads.prng import rng_words

WORKLOAD_NAME = "textlm"
CORPUS_MODULE = "pydoc_data.topics"
CORPUS_SOURCE = "pydoc_data.topics.topics"
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.08
END_OF_DOCUMENT = 0
VOCAB_SIZE = 256


def load_documents() -> dict[str, bytes]:
    """The corpus as it ships with this Python: topic name -> UTF-8 text."""
    topics = importlib.import_module(CORPUS_MODULE).topics
    if not isinstance(topics, dict) or not topics:
        raise DatasetMismatchError(
            f"{CORPUS_SOURCE} is {type(topics).__name__} of length "
            f"{len(topics) if hasattr(topics, '__len__') else '?'}; expected a non-empty dict"
        )
    return {name: topics[name].encode("utf-8") for name in sorted(topics)}


def corpus_fingerprint(documents: dict[str, bytes]) -> DatasetFingerprint:
    """SHA-256 over the documents in name order, each as ``name NUL text NUL``."""
    digest = hashlib.sha256()
    for name in sorted(documents):
        digest.update(name.encode("utf-8") + b"\0" + documents[name] + b"\0")
    total = sum(len(text) for text in documents.values())
    return DatasetFingerprint(
        name=WORKLOAD_NAME,
        source=(
            f"{CORPUS_SOURCE} of Python {platform.python_version()} "
            f"({len(documents)} documents, {total} bytes)"
        ),
        n_examples=len(documents),
        sha256=digest.hexdigest(),
    )


def split_documents(names: list[str], sizes: list[int]) -> dict[str, list[str]]:
    """Whole documents for validation, test and train, by a fixed permutation.

    Validation then test take documents in permuted order until each holds
    at least :data:`HELD_OUT_FRACTION` of all bytes; train keeps the rest.
    """
    if len(names) != len(sizes) or len(names) < 3:
        raise ValueError(f"need at least 3 documents with sizes; got {len(names)} / {len(sizes)}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    wanted = HELD_OUT_FRACTION * sum(sizes)
    splits: dict[str, list[str]] = {"validation": [], "test": [], "train": []}
    held_bytes = {"validation": 0, "test": 0}
    for index in order.tolist():
        split = next((s for s in ("validation", "test") if held_bytes[s] < wanted), "train")
        splits[split].append(names[index])
        if split != "train":
            held_bytes[split] += sizes[index]
    if not splits["train"]:
        raise ValueError("the held-out splits took every document; the corpus is too small")
    return {split: sorted(chosen) for split, chosen in splits.items()}


def join_documents(documents: dict[str, bytes], names: list[str]) -> np.ndarray:
    """One uint8 stream: each document followed by :data:`END_OF_DOCUMENT`."""
    stream = b"".join(documents[name] + bytes([END_OF_DOCUMENT]) for name in names)
    array = np.frombuffer(stream, dtype=np.uint8)
    array.setflags(write=False)
    return array


def evenly_spaced_windows(stream: np.ndarray, window: int, count: int) -> np.ndarray:
    """``count`` windows of ``window`` bytes, starting evenly over the stream (int32)."""
    if stream.size < window:
        raise ValueError(f"a stream of {stream.size} bytes cannot hold a {window}-byte window")
    starts = np.linspace(0, stream.size - window, num=count).round().astype(np.int64)
    return stream[starts[:, None] + np.arange(window)].astype(np.int32)


def as_example_split(windows: np.ndarray) -> Split:
    """Windows as next-byte examples: inputs are bytes 0..T-1, targets bytes 1..T."""
    inputs = np.ascontiguousarray(windows[:, :-1])
    targets = np.ascontiguousarray(windows[:, 1:])
    for array in (inputs, targets):
        array.setflags(write=False)
    return Split(inputs=inputs, targets=targets, indices=np.arange(len(windows)))


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """The split corpus: streams for sampling, fixed windows for evaluation."""

    documents: dict[str, list[str]]
    train_stream: np.ndarray
    train: Split  # the fixed eval_train windows
    validation: Split
    test: Split
    fingerprint: DatasetFingerprint

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


@functools.cache
def prepare_corpus(context_length: int, num_eval_windows: int) -> TextCorpus:
    """Loads, fingerprints and splits the corpus (cached per window shape)."""
    documents = load_documents()
    names = list(documents)
    chosen = split_documents(names, [len(documents[n]) for n in names])
    streams = {split: join_documents(documents, chosen[split]) for split in chosen}
    window = context_length + 1
    evaluated = {
        split: as_example_split(evenly_spaced_windows(streams[split], window, num_eval_windows))
        for split in chosen
    }
    return TextCorpus(
        documents=chosen,
        train_stream=streams["train"],
        train=evaluated["train"],
        validation=evaluated["validation"],
        test=evaluated["test"],
        fingerprint=corpus_fingerprint(documents),
    )


class RandomWindows:
    """Infinite training batches: ``batch_size`` windows at uniform random offsets."""

    def __init__(
        self, stream: np.ndarray, context_length: int, batch_size: int, data_rng: Any
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"global_batch_size={batch_size!r} must be >= 1")
        if stream.size <= context_length + 1:
            raise ValueError(f"a stream of {stream.size} bytes is too short for the context")
        self._stream = stream
        self._window = np.arange(context_length + 1)
        self._batch_size = int(batch_size)
        self._rng = np.random.default_rng(rng_words(data_rng))
        self._last_start = stream.size - context_length - 1

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        starts = self._rng.integers(0, self._last_start, size=self._batch_size, endpoint=True)
        windows = self._stream[starts[:, None] + self._window].astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class BaseTextLMWorkload(EmbeddedWorkload):
    """A decoder-only byte transformer on Python's reference-manual topics."""

    workload_name = WORKLOAD_NAME
    dataset_name = WORKLOAD_NAME
    vocab_size = VOCAB_SIZE
    context_length = 64
    model_dim = 64
    num_heads = 4
    num_layers = 3
    mlp_dim = 256
    num_eval_windows = 128
    _target_metric = "loss"
    _higher_is_better = False
    _validation_target = CalibratedValue("validation_target")
    _test_target = CalibratedValue("test_target")
    _step_hint = CalibratedValue("step_hint")
    _max_allowed_runtime_sec = 600
    _eval_period_steps = 50
    _eval_period_time_sec = 10
    _eval_batch_size = 128
    _recommended_batch_size = 32

    #: Whether the corpus must match the calibration record's fingerprint;
    #: the calibration script turns it off on the text it calibrates.
    _verify_corpus = True

    @property
    def loss_type(self) -> spec.LossType:
        return spec.LossType.SOFTMAX_CROSS_ENTROPY

    @property
    def _data(self) -> TextCorpus:  # type: ignore[override]
        corpus = prepare_corpus(self.context_length, self.num_eval_windows)
        if not self._verify_corpus:
            return corpus
        record = load_calibration(self.workload_name).record
        expected = record["dataset"]["sha256"]
        if corpus.fingerprint.sha256 != expected:
            raise DatasetMismatchError(
                f"{corpus.fingerprint.source} has SHA-256 {corpus.fingerprint.sha256}; the "
                f"{self.workload_name} targets were calibrated on {record['dataset']['source']} "
                f"(SHA-256 {expected}). Each Python release ships its own text, a different "
                "data set; calibrate it with `python scripts/calibrate_workloads.py "
                f"--workloads={self.workload_name}` before comparing times to target."
            )
        return corpus

    @property
    def num_train_examples(self) -> int:
        """Distinct non-overlapping windows in the training stream."""
        return int(self._data.train_stream.size // (self.context_length + 1))

    @property
    def num_eval_train_examples(self) -> int:
        return self.num_eval_windows

    @property
    def num_validation_examples(self) -> int:
        return self.num_eval_windows

    @property
    def num_test_examples(self) -> int:
        return self.num_eval_windows

    @property
    def num_features(self) -> int:
        return self.context_length

    @property
    def train_mean(self) -> tuple[float, ...]:
        return ()

    @property
    def train_stddev(self) -> tuple[float, ...]:
        return ()

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
        """Training windows are drawn afresh every step; eval splits as in the base class."""
        if split != "train":
            return super()._build_input_queue(
                data_rng,
                split,
                data_dir,
                global_batch_size,
                cache=cache,
                repeat_final_dataset=repeat_final_dataset,
                num_batches=num_batches,
            )
        windows = RandomWindows(
            self._data.train_stream, self.context_length, global_batch_size, data_rng
        )
        return InputQueue(windows, self._to_framework_batch, num_batches)


def expected_parameter_count(workload: BaseTextLMWorkload) -> int:
    """The parameter count the architecture implies (both twins must match it)."""
    d, m, v, t = workload.model_dim, workload.mlp_dim, workload.vocab_size, workload.context_length
    layer_norm = 2 * d
    block = layer_norm + (d * 3 * d + 3 * d) + (d * d + d) + layer_norm + (d * m + m) + (m * d + d)
    return v * d + t * d + workload.num_layers * block + layer_norm + (d * v + v)
