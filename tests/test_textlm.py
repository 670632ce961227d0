"""The textlm workload: corpus, document split, windows, twins and a few steps of training."""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polyak.algoperf import spec
from polyak.workloads import textlm
from polyak.workloads.data import DatasetMismatchError
from polyak.workloads.loop import LoopConfig, run_training
from polyak.workloads.registry import make_workload

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus() -> textlm.TextCorpus:
    workload = textlm.BaseTextLMWorkload
    return textlm.prepare_corpus(workload.context_length, workload.num_eval_windows)


# ---- corpus, split, windows ------------------------------------------------------------


def test_fingerprint_is_recomputed_from_the_installed_topics():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    digest = hashlib.sha256()
    for name in sorted(topics):
        digest.update(name.encode() + b"\0" + topics[name].encode() + b"\0")
    fingerprint = textlm.corpus_fingerprint(textlm.load_documents())
    assert fingerprint.sha256 == digest.hexdigest()
    assert fingerprint.n_examples == len(topics)
    assert f"Python {platform.python_version()}" in fingerprint.source
    assert make_workload("textlm", "pytorch").dataset_fingerprint == fingerprint


def test_another_text_is_refused_with_both_fingerprints(monkeypatch):
    documents = textlm.load_documents()
    changed = dict(documents, assert_=b"a topic another Python release might add")
    monkeypatch.setattr(textlm, "load_documents", lambda: changed)
    textlm.prepare_corpus.cache_clear()
    try:
        workload = make_workload("textlm", "pytorch")
        with pytest.raises(DatasetMismatchError, match=r"calibrated on .*SHA-256 [0-9a-f]{64}"):
            workload.dataset_fingerprint  # noqa: B018
        workload._verify_corpus = False  # what the calibration script does
        assert workload.dataset_fingerprint.n_examples == len(documents) + 1
    finally:
        textlm.prepare_corpus.cache_clear()


def test_documents_are_split_whole_disjoint_complete_and_deterministic(corpus):
    documents = textlm.load_documents()
    chosen = corpus.documents
    names = [set(chosen[s]) for s in ("train", "validation", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set().union(*names) == set(documents)
    total = sum(len(text) for text in documents.values())
    for split in ("validation", "test"):
        held = sum(len(documents[n]) for n in chosen[split])
        assert held >= textlm.HELD_OUT_FRACTION * total
    again = textlm.split_documents(list(documents), [len(t) for t in documents.values()])
    assert again == chosen
    expected_train = b"".join(documents[n] + b"\0" for n in sorted(chosen["train"]))
    assert corpus.train_stream.tobytes() == expected_train


def test_eval_windows_come_from_their_own_documents(corpus):
    documents = textlm.load_documents()
    window = textlm.BaseTextLMWorkload.context_length + 1
    for split in ("validation", "test", "eval_train"):
        names = corpus.documents["train" if split == "eval_train" else split]
        stream = b"".join(documents[n] + b"\0" for n in names)
        examples = corpus.split(split)
        assert examples.inputs.shape == (textlm.BaseTextLMWorkload.num_eval_windows, window - 1)
        np.testing.assert_array_equal(examples.inputs[:, 1:], examples.targets[:, :-1])
        for inputs, targets in zip(examples.inputs, examples.targets, strict=True):
            text = bytes(inputs.astype(np.uint8)) + bytes([int(targets[-1])])
            assert text in stream


def test_training_windows_are_random_shifted_and_seeded(corpus):
    length = textlm.BaseTextLMWorkload.context_length
    first = textlm.RandomWindows(corpus.train_stream, length, 8, np.array([1, 2]))
    batch = next(first)
    assert batch["inputs"].shape == batch["targets"].shape == (8, length)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    same = next(textlm.RandomWindows(corpus.train_stream, length, 8, np.array([1, 2])))
    other = next(textlm.RandomWindows(corpus.train_stream, length, 8, np.array([1, 3])))
    np.testing.assert_array_equal(batch["inputs"], same["inputs"])
    assert not np.array_equal(batch["inputs"], other["inputs"])
    assert not np.array_equal(batch["inputs"], next(first)["inputs"])  # fresh every step


# ---- the twins ---------------------------------------------------------------------------


def _torch_to_flax(model: Any) -> dict[str, Any]:
    """Our torch state_dict as a flax params tree (Dense kernels are transposed weights)."""
    import jax.numpy as jnp

    params: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        *path, leaf = name.split(".")
        array = value.numpy()
        if leaf == "weight":
            if path == ["token_embedding"]:
                leaf = "embedding"
            elif path[-1].startswith("ln") or path[-1] == "final_norm":
                leaf = "scale"
            else:
                leaf, array = "kernel", array.T
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(array)
    return params


@pytest.fixture(scope="module")
def twins() -> tuple[Any, Any, Any, Any]:
    import jax

    torch_workload = make_workload("textlm", "pytorch")
    jax_workload = make_workload("textlm", "jax")
    model, _ = torch_workload.init_model_fn(0)
    params, _ = jax_workload.init_model_fn(jax.random.PRNGKey(0))
    return torch_workload, jax_workload, model, params


def test_parameter_shapes_counts_and_types_match_across_twins(twins):
    import jax

    torch_workload, jax_workload, model, params = twins
    expected = textlm.expected_parameter_count(torch_workload)
    assert 100_000 < expected < 1_000_000
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(x.size for x in jax.tree.leaves(params)) == expected
    converted = _torch_to_flax(model)
    assert jax.tree.structure(converted) == jax.tree.structure(params)
    shapes = jax.tree.map(lambda x: x.shape, converted)
    assert shapes == jax.tree.map(lambda x: x.shape, params)
    torch_types = torch_workload.model_params_types
    jax_types = jax_workload.model_params_types
    assert torch_types["token_embedding.weight"] == spec.ParameterType.EMBEDDING
    assert jax_types["position_embedding"] == spec.ParameterType.EMBEDDING
    for name, kind in torch_types.items():
        *path, leaf = name.split(".")
        node = jax_types
        for key in path:
            node = node[key]
        jax_leaf = {"weight": "kernel", "bias": "bias"}.get(leaf, leaf)
        if jax_leaf not in node:  # LayerNorm scale, embedding table
            jax_leaf = next(k for k in node if k not in ("bias",))
        assert node[jax_leaf] == kind, name
    stddev = float(np.std(model.block0.qkv.weight.detach().numpy()))
    assert stddev == pytest.approx(0.02, rel=0.1)
    assert float(np.std(np.asarray(params["block0"]["qkv"]["kernel"]))) == pytest.approx(
        0.02, rel=0.1
    )


def test_same_weights_give_the_same_loss_in_both_frameworks(twins):
    import jax.numpy as jnp

    torch_workload, jax_workload, model, _ = twins
    queue = torch_workload._build_input_queue(np.array([4, 5]), "validation", None, 16)
    batch = next(queue)
    batch["weights"][-3:] = 0.0
    jax_batch = {key: jnp.asarray(value.numpy()) for key, value in batch.items()}
    params = _torch_to_flax(model)
    eval_mode = spec.ForwardPassMode.EVAL
    torch_logits, _ = torch_workload.model_fn(model, batch, None, eval_mode, None, False)
    jax_logits, _ = jax_workload.model_fn(params, jax_batch, None, eval_mode, None, False)
    np.testing.assert_allclose(torch_logits.numpy(), np.asarray(jax_logits), atol=2e-5)
    for smoothing in (0.0, 0.1):
        torch_loss = torch_workload.loss_fn(
            batch["targets"], torch_logits, batch["weights"], smoothing
        )
        jax_loss = jax_workload.loss_fn(
            jax_batch["targets"], jax_logits, jax_batch["weights"], smoothing
        )
        assert float(torch_loss["n_valid_examples"]) == float(jax_loss["n_valid_examples"]) == 13
        assert float(torch_loss["summed"]) == pytest.approx(float(jax_loss["summed"]), rel=1e-5)
    # Untrained, the model predicts about uniformly over 256 bytes.
    assert float(torch_loss["summed"]) / 13 == pytest.approx(np.log(256), rel=0.05)


def test_torch_dropout_is_seeded_by_the_step_rng_and_off_in_eval(twins):
    import torch

    torch_workload, _, model, _ = twins
    batch = next(torch_workload._build_input_queue(np.array([1, 1]), "train", None, 8))
    train = spec.ForwardPassMode.TRAIN

    def logits(rng: Any, rate: float) -> torch.Tensor:
        with torch.no_grad():
            return torch_workload.model_fn(model, batch, None, train, rng, True, rate)[0]

    np.testing.assert_array_equal(logits(np.array([0, 1]), 0.1), logits(np.array([0, 1]), 0.1))
    assert not torch.equal(logits(np.array([0, 1]), 0.1), logits(np.array([0, 2]), 0.1))
    assert torch.equal(
        logits(None, 0.0),
        torch_workload.model_fn(model, batch, None, spec.ForwardPassMode.EVAL, None, False)[0],
    )


# ---- through the loop ----------------------------------------------------------------------


def _submission(framework: str) -> Any:
    path = REPO / "submissions" / "nadamw" / framework / "submission.py"
    module_spec = importlib.util.spec_from_file_location(f"textlm_nadamw_{framework}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_a_few_nadamw_steps_through_the_loop_lower_the_loss(framework):
    hyperparameters = {
        "learning_rate": 3e-3,
        "one_minus_beta1": 0.1,
        "beta2": 0.99,
        "weight_decay": 0.0,
        "warmup_factor": 0.0,
        "dropout_rate": 0.1,
        "label_smoothing": 0.0,
        "averaging": "none",
    }
    result = run_training(
        "textlm",
        _submission(framework),
        hyperparameters,
        framework=framework,
        config=LoopConfig(max_steps=12, eval_every_steps=11, stop_at_target=False),
    )
    assert [e.global_step for e in result.evals] == [1, 12]
    first, last = (e.metrics["validation/loss"] for e in result.evals)
    assert last < first
    assert result.evals[-1].metrics["validation/num_examples"] == 128
    assert result.dataset == make_workload("textlm", framework).dataset_fingerprint
    assert result.direction == "min" and result.target_metric_name == "loss"


def test_twins_import_only_their_framework():
    if importlib.util.find_spec("algoperf") is not None:
        pytest.skip("algoperf.spec itself imports both frameworks")
    for module, other in (("textlm_torch", "jax"), ("textlm_jax", "torch")):
        code = f"import sys, polyak.workloads.{module}; assert {other!r} not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True)
