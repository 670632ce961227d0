"""The embedded workloads: data checks, splits, and the AlgoPerf Workload interface."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from polyak.algoperf import spec
from polyak.workloads import data
from polyak.workloads.registry import EMBEDDED_WORKLOADS, UnknownWorkloadError, make_workload

FRAMEWORKS = ("pytorch", "jax")
CASES = [(name, fw) for name in ("digits", "diabetes") for fw in FRAMEWORKS]


def _sklearn_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name == "digits":
        return datasets.load_digits(return_X_y=True)
    return datasets.load_diabetes(return_X_y=True, scaled=False)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ---- data -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "features"), [("digits", 1797, 64), ("diabetes", 442, 10)]
)
def test_fingerprint_is_sha256_of_raw_float64_arrays(name, count, features):
    inputs, targets = _sklearn_arrays(name)
    expected = hashlib.sha256(
        inputs.astype("<f8").tobytes(order="C") + targets.astype("<f8").tobytes()
    ).hexdigest()
    raw = data.load_raw_dataset(name)
    assert raw.fingerprint == data.DatasetFingerprint(
        name=name, source=raw.fingerprint.source, n_examples=count, sha256=expected
    )
    assert raw.inputs.shape == (count, features)
    assert "sklearn.datasets" in raw.fingerprint.source


def test_wrong_count_or_changed_data_is_refused(monkeypatch):
    inputs, targets = _sklearn_arrays("diabetes")
    monkeypatch.setattr(data, "_load_raw_arrays", lambda name: (inputs[:-1], targets[:-1]))
    with pytest.raises(
        data.DatasetMismatchError, match=r"\(441, 10\).*expected inputs \(442, 10\)"
    ):
        data.load_raw_dataset("diabetes")
    changed = inputs.copy()
    changed[0, 0] += 1.0
    monkeypatch.setattr(data, "_load_raw_arrays", lambda name: (changed, targets))
    with pytest.raises(data.DatasetMismatchError, match="SHA-256"):
        data.load_raw_dataset("diabetes")
    with pytest.raises(ValueError, match="unknown embedded dataset 'mnist'"):
        data.load_raw_dataset("mnist")


@pytest.mark.parametrize("name", ["digits", "diabetes"])
def test_splits_are_disjoint_complete_deterministic_and_standardized_on_train(name):
    prepared = data.prepare_dataset(name)
    spec_ = data.DATASET_SPECS[name]
    rows = [prepared.train.indices, prepared.validation.indices, prepared.test.indices]
    assert [len(r) for r in rows] == [spec_.num_train, spec_.num_validation, spec_.num_test]
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(spec_.n_examples))
    again = data.split_indices(spec_.n_examples, spec_.num_validation, spec_.num_test)
    for split, index in zip(("train", "validation", "test"), rows, strict=True):
        assert np.array_equal(again[split], index)

    raw_inputs, raw_targets = _sklearn_arrays(name)
    train_raw = raw_inputs[prepared.train.indices]
    mean, std = train_raw.mean(axis=0), train_raw.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    validation_expected = (raw_inputs[prepared.validation.indices] - mean) / std
    np.testing.assert_allclose(
        prepared.validation.inputs, validation_expected, rtol=1e-5, atol=1e-5
    )
    if name == "diabetes":
        y_train = raw_targets[prepared.train.indices]
        expected_y = (raw_targets[prepared.test.indices] - y_train.mean()) / y_train.std()
        np.testing.assert_allclose(prepared.test.targets, expected_y, rtol=1e-5, atol=1e-6)
        assert abs(float(prepared.train.targets.mean())) < 1e-5
    else:
        assert np.array_equal(prepared.test.targets, raw_targets[prepared.test.indices])


def test_train_batches_shuffle_per_epoch_cover_everything_and_fast_forward():
    n, batch = 21, 7
    split = data.Split(
        inputs=np.arange(n, dtype=np.float32)[:, None],
        targets=np.arange(n, dtype=np.int32),
        indices=np.arange(n),
    )
    stream = data.TrainBatches(split, batch, data_rng=np.array([3, 4]))
    epochs = [
        np.concatenate([next(stream)["targets"] for _ in range(n // batch)]) for _ in range(3)
    ]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation per epoch

    same = data.TrainBatches(split, batch, data_rng=np.array([3, 4]))
    assert np.array_equal(next(same)["targets"], epochs[0][:batch])
    other = data.TrainBatches(split, batch, data_rng=np.array([3, 5]))
    assert not np.array_equal(next(other)["targets"], epochs[0][:batch])

    skipped = data.TrainBatches(split, batch, data_rng=np.array([3, 4]))
    skipped.fast_forward(4)
    assert np.array_equal(next(skipped)["targets"], epochs[1][batch : 2 * batch])


def test_eval_batches_pad_with_zero_weights():
    split = data.prepare_dataset("diabetes").validation
    batches = data.eval_batches(split, 88, 32)
    assert [b["inputs"].shape[0] for b in batches] == [32, 32, 32]
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 88 and np.all(weights[88:] == 0)
    targets = np.concatenate([b["targets"] for b in batches])[:88]
    assert np.array_equal(targets, split.targets)


# ---- registry ----------------------------------------------------------------------


def test_registry_names_and_errors():
    assert EMBEDDED_WORKLOADS == ("digits", "diabetes", "textlm")
    with pytest.raises(UnknownWorkloadError, match=r"'mnist'.*digits, diabetes, textlm"):
        make_workload("mnist", "jax")
    with pytest.raises(UnknownWorkloadError, match=r"'tensorflow'.*pytorch, jax"):
        make_workload("digits", "tensorflow")
    assert issubclass(UnknownWorkloadError, ValueError)


def test_registry_loop_and_twins_import_only_their_framework():
    code = """
import sys
import polyak.workloads.registry, polyak.workloads.loop, polyak.workloads.data
assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'registry/loop'
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    if importlib.util.find_spec("algoperf") is not None:
        return  # algoperf.spec itself imports both frameworks
    code_torch = """
import sys
import polyak.workloads.digits_torch, polyak.workloads.diabetes_torch
import polyak.workloads.loop_torch
assert 'jax' not in sys.modules, 'torch twin imported jax'
"""
    code_jax = """
import sys
import polyak.workloads.digits_jax, polyak.workloads.diabetes_jax, polyak.workloads.loop_jax
assert 'torch' not in sys.modules, 'jax twin imported torch'
"""
    for code in (code_torch, code_jax):
        subprocess.run([sys.executable, "-c", code], check=True)


# ---- the Workload interface ----------------------------------------------------------


def _init_rng(framework: str, seed: int = 0):
    if framework == "jax":
        import jax

        return jax.random.PRNGKey(seed)
    return np.array([seed, 7], dtype=np.int32)


def _param_leaves(framework, params):
    if framework == "pytorch":
        return {name: p.detach().numpy().copy() for name, p in params.named_parameters()}
    import jax

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{f}" for n, f in CASES])
def initialized(request):
    name, framework = request.param
    workload = make_workload(name, framework)
    params, model_state = workload.init_model_fn(_init_rng(framework))
    return name, framework, workload, params, model_state


def test_targets_budgets_and_names(initialized):
    name, framework, workload, _, _ = initialized
    assert workload.workload_name == name and workload.framework == framework
    expected_metric = {"digits": "loss", "diabetes": "mse"}[name]
    assert workload.target_metric_name == expected_metric
    assert (
        workload.loss_type
        == {
            "digits": spec.LossType.SOFTMAX_CROSS_ENTROPY,
            "diabetes": spec.LossType.MEAN_SQUARED_ERROR,
        }[name]
    )
    for value in (
        workload.step_hint,
        workload.max_allowed_runtime_sec,
        workload.eval_period_time_sec,
        workload.eval_period_steps,
        workload.eval_batch_size,
    ):
        assert isinstance(value, int) and value > 0
    assert workload.eval_batch_size % 8 == 0 and workload.recommended_batch_size % 8 == 0
    assert (
        workload.num_train_examples
        + workload.num_validation_examples
        + (workload.num_test_examples)
        == data.DATASET_SPECS[name].n_examples
    )
    assert workload.dataset_sha256 == data.DATASET_SPECS[name].expected_sha256
    assert len(workload.train_mean) == len(workload.train_stddev) == workload.num_features


def test_has_reached_targets_direction(initialized):
    _, _, workload, _, _ = initialized
    metric = workload.target_metric_name
    val, test = workload.validation_target_value, workload.test_target_value
    better = -1  # digits' cross-entropy and diabetes' mse: lower is better

    def result(v, t):
        return {f"validation/{metric}": v, f"test/{metric}": t}

    assert workload.has_reached_validation_target(result(val + better * 1e-3, 0.0))
    assert not workload.has_reached_validation_target(result(val, 0.0))  # strict, as AlgoPerf
    assert not workload.has_reached_validation_target(result(val - better * 1e-3, 0.0))
    assert workload.has_reached_test_target(result(0.0, test + better * 1e-3))
    assert not workload.has_reached_test_target(result(0.0, test))
    assert workload.target_direction == "min"


def test_param_shapes_and_types_cover_every_parameter(initialized):
    _, framework, workload, params, model_state = initialized
    leaves = _param_leaves(framework, params)
    if framework == "pytorch":
        shapes = {k: v.shape_tuple for k, v in workload.param_shapes.items()}
        types = workload.model_params_types
        assert model_state is None
    else:
        import jax

        shapes = {
            jax.tree_util.keystr(p): s.shape_tuple
            for p, s in jax.tree_util.tree_flatten_with_path(workload.param_shapes)[0]
        }
        types = {
            jax.tree_util.keystr(p): t
            for p, t in jax.tree_util.tree_flatten_with_path(workload.model_params_types)[0]
        }
        assert (model_state is not None) == workload.use_batch_norm
    assert shapes == {k: v.shape for k, v in leaves.items()}
    assert set(types) == set(leaves)
    for key, kind in types.items():
        assert isinstance(kind, spec.ParameterType)
        if "bn" in key:
            assert kind in (spec.ParameterType.BATCH_NORM_SCALE, spec.ParameterType.BATCH_NORM_BIAS)
        elif "bias" in key:
            assert kind == spec.ParameterType.BIAS
        else:
            assert kind == spec.ParameterType.WEIGHT
    bn_keys = [k for k in types if "bn" in k]
    assert bool(bn_keys) == workload.use_batch_norm
    output_keys = ["output.weight", "output.bias"] if framework == "pytorch" else ["output"]
    assert all(workload.is_output_params(k) for k in output_keys)
    assert not workload.is_output_params("dense1.weight" if framework == "pytorch" else "dense1")


def test_init_is_seeded_from_rng(initialized):
    name, framework, workload, params, _ = initialized
    again = make_workload(name, framework).init_model_fn(_init_rng(framework))[0]
    other = make_workload(name, framework).init_model_fn(_init_rng(framework, seed=1))[0]
    first, same, different = (_param_leaves(framework, p) for p in (params, again, other))
    for key in first:
        np.testing.assert_array_equal(first[key], same[key])
    weight_key = next(k for k in first if "dense1" in k and ("weight" in k or "kernel" in k))
    assert not np.array_equal(first[weight_key], different[weight_key])
    fan_in = workload.num_features
    assert np.abs(first[weight_key]).max() <= 1 / np.sqrt(fan_in) + 1e-7


def test_torch_init_accepts_int_and_jax_keys_and_leaves_global_rng_alone():
    import jax
    import torch

    workload = make_workload("diabetes", "pytorch")
    state = torch.get_rng_state()
    by_int = _param_leaves("pytorch", workload.init_model_fn(5)[0])
    assert torch.equal(state, torch.get_rng_state())
    by_key = _param_leaves("pytorch", workload.init_model_fn(jax.random.PRNGKey(5))[0])
    by_typed = _param_leaves("pytorch", workload.init_model_fn(jax.random.key(5))[0])
    for key in by_key:
        np.testing.assert_array_equal(by_key[key], by_typed[key])
    assert not np.array_equal(by_int["dense1.weight"], by_key["dense1.weight"])


def _batch(workload, split: str, size: int):
    queue = workload._build_input_queue(np.array([0, 1]), split, None, size)
    return next(queue)


def test_model_fn_and_loss_fn_match_a_manual_computation(initialized):
    name, framework, workload, params, model_state = initialized
    batch = _batch(workload, "validation", 16)
    logits, _ = workload.model_fn(
        params, batch, model_state, spec.ForwardPassMode.EVAL, None, False, 0.0
    )
    logits_np = _to_numpy(logits).astype(np.float64)
    assert logits_np.shape == (16, workload.num_outputs)
    targets = _to_numpy(batch["targets"])
    mask = np.ones(16, dtype=np.float32)
    mask[-5:] = 0.0
    mask_arg = mask
    if framework == "pytorch":
        import torch

        mask_arg = torch.tensor(mask)
    smoothing = 0.2
    losses = workload.loss_fn(batch["targets"], logits, mask_arg, smoothing)
    if name == "digits":
        k = logits_np.shape[1]
        shifted = logits_np - logits_np.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        soft = np.full_like(log_probs, smoothing / k)
        soft[np.arange(16), targets] += 1.0 - smoothing
        expected = -(soft * log_probs).sum(axis=1)
    else:
        expected = (logits_np[:, 0] - targets) ** 2
    expected = expected * mask
    np.testing.assert_allclose(_to_numpy(losses["per_example"]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(losses["summed"]), expected.sum(), rtol=1e-5)
    assert float(losses["n_valid_examples"]) == 11.0
    unmasked = workload.loss_fn(batch["targets"], logits)
    assert float(unmasked["n_valid_examples"]) == 16.0


def test_eval_model_reports_algoperf_keys_and_correct_values(initialized):
    name, framework, workload, params, model_state = initialized
    results = workload.eval_model(
        workload.eval_batch_size, params, model_state, None, None, None, 0
    )
    metric = workload.target_metric_name
    for prefix in ("train", "validation", "test"):
        assert f"{prefix}/{metric}" in results and f"{prefix}/loss" in results
    assert results["validation/num_examples"] == workload.num_validation_examples
    assert results["test/num_examples"] == workload.num_test_examples

    split = data.prepare_dataset(name).validation
    inputs = split.inputs
    if framework == "pytorch":
        import torch

        inputs = torch.tensor(inputs)
    logits, _ = workload.model_fn(
        params, {"inputs": inputs}, model_state, spec.ForwardPassMode.EVAL, None, False, 0.0
    )
    logits = _to_numpy(logits)
    if name == "digits":
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        expected = float(-np.mean(log_probabilities[np.arange(len(split.targets)), split.targets]))
        accuracy = float(np.mean(logits.argmax(axis=1) == split.targets))
        assert results["validation/accuracy"] == pytest.approx(accuracy, rel=1e-5)
    else:
        expected = float(np.mean((logits[:, 0] - split.targets) ** 2))
    assert results[f"validation/{metric}"] == pytest.approx(expected, rel=1e-5)


def test_train_mode_dropout_and_batch_norm_updates(initialized):
    _, framework, workload, params, model_state = initialized
    batch = _batch(workload, "train", 32)
    rng = _init_rng(framework, seed=3)

    def forward(rate, update, key=rng):
        logits, state = workload.model_fn(
            params, batch, model_state, spec.ForwardPassMode.TRAIN, key, update, rate
        )
        return _to_numpy(logits), state

    plain, _ = forward(0.0, False)
    dropped, _ = forward(0.5, False)
    dropped_again, _ = forward(0.5, False)
    dropped_other, _ = forward(0.5, False, key=_init_rng(framework, seed=4))
    assert not np.allclose(plain, dropped)
    np.testing.assert_array_equal(dropped, dropped_again)
    assert not np.allclose(dropped, dropped_other)

    if not workload.use_batch_norm:
        return
    if framework == "pytorch":
        running = params.bn1.running_mean.clone()
        forward(0.0, False)
        assert np.array_equal(params.bn1.running_mean.numpy(), running.numpy())
        forward(0.0, True)
        assert not np.array_equal(params.bn1.running_mean.numpy(), running.numpy())
        params.bn1.running_mean.copy_(running)
    else:
        _, kept = forward(0.0, False)
        assert kept is model_state
        _, updated = forward(0.0, True)
        assert set(updated) == {"batch_stats"}
        assert not np.allclose(
            np.asarray(updated["batch_stats"]["bn1"]["mean"]),
            np.asarray(model_state["batch_stats"]["bn1"]["mean"]),
        )


def test_jax_batches_are_sharded_over_all_devices_and_params_replicated():
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    workload = make_workload("digits", "jax")
    params, model_state = workload.init_model_fn(jax.random.PRNGKey(0))
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    batch = _batch(workload, "train", 64)
    for value in batch.values():
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), value.ndim)
        shards = value.addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 8 for s in shards)
    for leaf in jax.tree_util.tree_leaves((params, model_state)):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), leaf.ndim)
        assert leaf.sharding.is_fully_replicated
    eval_batch = _batch(workload, "validation", 256)
    assert set(eval_batch) == {"inputs", "targets", "weights"}
    with pytest.raises(ValueError, match="not divisible by the 8 JAX devices"):
        _batch(workload, "train", 60)


def test_real_algoperf_workload_base_is_subclassed():
    algoperf_spec = pytest.importorskip("algoperf.spec")
    for name, framework in CASES:
        workload = make_workload(name, framework)
        assert isinstance(workload, algoperf_spec.Workload)
