"""The local loop: AlgoPerf's step/eval/timing semantics, outputs, checkpoints, resume."""

from __future__ import annotations

import copy
import csv
import json
import os
import pickle
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch

from polyak.algoperf import spec
from polyak.workloads import loop
from polyak.workloads.diabetes_torch import DiabetesWorkload
from polyak.workloads.loop import LoopConfig, run_training
from polyak.workloads.registry import make_workload

FIXTURES = Path(__file__).parent / "fixtures" / "loop"
TIME_KEYS = {"score", "total_duration", "accumulated_submission_time", "accumulated_eval_time"}
TIME_KEYS |= {"accumulated_logging_time"}


class Crash(RuntimeError):
    """Stands for a preemption in the middle of a run."""


# ---- fake submissions (written here, independent of polyak.algoperf) -----------------


class Velocity:
    """Plain SGD momentum buffers with AlgoPerf's state_dict protocol."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.buffers = [torch.zeros_like(p) for p in params]
        self.loads = 0

    def state_dict(self) -> dict:
        return {"buffers": [b.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        self.loads += 1
        for buffer, saved in zip(self.buffers, state["buffers"], strict=True):
            buffer.copy_(saved)


class TorchSGD:
    """Momentum SGD with dropout, train-metric logging and a pinch of global-RNG noise."""

    def __init__(self, batch_size: int = 32, crash_at: int | None = None) -> None:
        self.batch_size = batch_size
        self.crash_at = crash_at
        self.final_state: dict | None = None

    def get_batch_size(self, workload_name):
        return self.batch_size

    def init_optimizer_state(self, workload, model_params, model_state, hyperparameters, rng):
        return {"velocity": Velocity(list(model_params.parameters()))}

    def update_params(
        self,
        workload,
        current_param_container,
        current_params_types,
        model_state,
        hyperparameters,
        batch,
        loss_type,
        optimizer_state,
        eval_results,
        global_step,
        rng,
        train_state=None,
    ):
        if global_step == self.crash_at:
            raise Crash(f"preempted at step {global_step}")
        model = current_param_container
        model.zero_grad()
        logits, new_state = workload.model_fn(
            model, batch, model_state, spec.ForwardPassMode.TRAIN, rng, True, 0.1
        )
        losses = workload.loss_fn(batch["targets"], logits, batch.get("weights"), 0.1)
        loss = losses["summed"] / losses["n_valid_examples"]
        loss.backward()
        with torch.no_grad():
            for p, v in zip(model.parameters(), optimizer_state["velocity"].buffers, strict=True):
                noisy = p.grad + 1e-4 * torch.randn_like(p)
                v.mul_(0.9).add_(noisy)
                p.sub_(hyperparameters["learning_rate"] * v)
        workload.metrics_logger.append_scalar_metrics({"loss": loss.item()}, global_step)
        self.final_state = {k: v.clone() for k, v in model.state_dict().items()}
        return optimizer_state, model, new_state

    def prepare_for_eval(
        self,
        workload,
        current_param_container,
        current_params_types,
        model_state,
        hyperparameters,
        loss_type,
        optimizer_state,
        eval_results,
        global_step,
        rng,
    ):
        return optimizer_state, current_param_container, model_state

    def data_selection(
        self,
        workload,
        input_queue,
        optimizer_state,
        current_param_container,
        model_state,
        hyperparameters,
        global_step,
        rng,
    ):
        return next(input_queue)


class JaxSGD:
    """Momentum SGD in JAX; optimizer_state is AlgoPerf's (pytree, update_fn) 2-tuple."""

    def __init__(self, batch_size: int = 32, crash_at: int | None = None) -> None:
        self.batch_size = batch_size
        self.crash_at = crash_at
        self.final_params = None

    def get_batch_size(self, workload_name):
        return self.batch_size

    def init_optimizer_state(self, workload, model_params, model_state, hyperparameters, rng):
        import jax
        import jax.numpy as jnp

        pytree = {
            "velocity": jax.tree.map(jnp.zeros_like, model_params),
            "count": jnp.zeros([], jnp.int32),
        }
        # Same placement as the params from the start: one compiled step, not two.
        replicated = jax.tree_util.tree_leaves(model_params)[0].sharding
        return jax.device_put(pytree, replicated), _jax_sgd_step

    def update_params(
        self,
        workload,
        current_param_container,
        current_params_types,
        model_state,
        hyperparameters,
        batch,
        loss_type,
        optimizer_state,
        eval_results,
        global_step,
        rng,
        train_state=None,
    ):
        if global_step == self.crash_at:
            raise Crash(f"preempted at step {global_step}")
        pytree, step = optimizer_state
        params, new_state, pytree, loss = step(
            workload,
            current_param_container,
            model_state,
            pytree,
            batch,
            rng,
            hyperparameters["learning_rate"],
        )
        if global_step % 5 == 0:
            workload.metrics_logger.append_scalar_metrics({"loss": float(loss)}, global_step)
        self.final_params = params
        return (pytree, step), params, new_state

    prepare_for_eval = TorchSGD.prepare_for_eval
    data_selection = TorchSGD.data_selection


def _jax_sgd_step_impl(workload, params, model_state, pytree, batch, rng, learning_rate):
    import jax

    def loss_of(p):
        logits, new_state = workload.model_fn(
            p, batch, model_state, spec.ForwardPassMode.TRAIN, rng, True, 0.1
        )
        losses = workload.loss_fn(batch["targets"], logits, batch.get("weights"), 0.1)
        return losses["summed"] / losses["n_valid_examples"], new_state

    (loss, new_state), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    velocity = jax.tree.map(lambda v, g: 0.9 * v + g, pytree["velocity"], grads)
    params = jax.tree.map(lambda p, v: p - learning_rate * v, params, velocity)
    return params, new_state, {"velocity": velocity, "count": pytree["count"] + 1}, loss


def _jax_sgd_step(*args):
    global _JITTED_STEP
    if _JITTED_STEP is None:
        import jax

        _JITTED_STEP = jax.jit(_jax_sgd_step_impl, static_argnums=(0,))
    return _JITTED_STEP(*args)


_JITTED_STEP = None


class Recording(TorchSGD):
    """No learning: records what the loop hands over, prepare_for_eval marks its output."""

    def __init__(self, prepare_sleep: float = 0.0, mark: bool = True) -> None:
        super().__init__(batch_size=32)
        self.prepare_sleep = prepare_sleep
        self.mark = mark
        self.updates: list[dict] = []
        self.prepared: list[dict] = []

    def update_params(
        self,
        workload,
        current_param_container,
        current_params_types,
        model_state,
        hyperparameters,
        batch,
        loss_type,
        optimizer_state,
        eval_results,
        global_step,
        rng,
        train_state=None,
    ):
        self.updates.append(
            {
                "step": global_step,
                "params": current_param_container,
                "optimizer_state": optimizer_state,
                "rng": np.array(rng),
                "train_state": train_state,
                "types": current_params_types,
                "loss_type": loss_type,
                "batch_size": batch["inputs"].shape[0],
                "eval_steps": [step for step, _ in eval_results],
            }
        )
        return optimizer_state, current_param_container, model_state

    def prepare_for_eval(
        self,
        workload,
        current_param_container,
        current_params_types,
        model_state,
        hyperparameters,
        loss_type,
        optimizer_state,
        eval_results,
        global_step,
        rng,
    ):
        time.sleep(self.prepare_sleep)
        params, state = current_param_container, dict(optimizer_state)
        if self.mark:
            params = copy.deepcopy(current_param_container)
            params.marked_at = global_step
            state["marked_at"] = global_step
        self.prepared.append({"step": global_step, "params": params, "optimizer_state": state})
        return state, params, model_state


class ScriptedDiabetes(DiabetesWorkload):
    """Eval results follow a script, so stopping rules can be checked exactly."""

    def __init__(self, validation: list[float], test: list[float], eval_sleep: float = 0.0):
        super().__init__()
        self._script = list(zip(validation, test, strict=True))
        self._validation_target = 0.75
        self._test_target = 0.85
        self.eval_sleep = eval_sleep
        self.evaluated: list = []

    def eval_model(self, global_batch_size, params, model_state, rng, data_dir, v2_dir, step):
        time.sleep(self.eval_sleep)
        self.evaluated.append(params)
        validation, test = self._script[min(len(self.evaluated), len(self._script)) - 1]
        return {"validation/mse": validation, "test/mse": test, "validation/num_examples": 88}


HPARAMS = {"learning_rate": 0.03, "dropout_rate": 0.1}


# ---- step, eval and timing semantics ------------------------------------------------------


def test_steps_and_evals_follow_algoperf_order():
    submission = Recording(mark=False)
    workload = make_workload("diabetes", "pytorch")
    result = run_training(
        workload,
        submission,
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=12, eval_every_steps=5, stop_at_target=False),
    )
    assert [u["step"] for u in submission.updates] == list(range(12))
    assert [e.global_step for e in result.evals] == [1, 6, 11, 12]
    assert [p["step"] for p in submission.prepared] == [1, 6, 11, 12]
    assert result.total_steps == 12 and result.stop_reason == "max_steps"
    # update_params sees AlgoPerf's arguments.
    first = submission.updates[0]
    assert first["types"] is workload.model_params_types
    assert first["loss_type"] == spec.LossType.MEAN_SQUARED_ERROR
    assert first["batch_size"] == 32
    assert isinstance(first["train_state"], MappingProxyType)
    assert submission.updates[6]["eval_steps"] == [1, 6]
    rngs = [u["rng"] for u in submission.updates]
    assert all(r.shape == (2,) for r in rngs)
    assert len({tuple(r.tolist()) for r in rngs}) == 12
    again = Recording(mark=False)
    run_training(
        "diabetes",
        again,
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=12, eval_every_steps=5),
    )
    assert all(
        np.array_equal(a["rng"], b["rng"]) for a, b in zip(submission.updates, again.updates)
    )


def test_prepare_for_eval_output_is_evaluated_and_trained_next():
    submission = Recording(mark=True)
    workload = make_workload("diabetes", "pytorch")
    evaluated = []
    original_eval = workload.eval_model

    def spy(global_batch_size, params, *args):
        evaluated.append(params)
        return original_eval(global_batch_size, params, *args)

    workload.eval_model = spy
    run_training(
        workload,
        submission,
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=8, eval_every_steps=3, stop_at_target=False),
    )
    assert [p["step"] for p in submission.prepared] == [1, 4, 7, 8]
    assert [p.marked_at for p in evaluated] == [1, 4, 7, 8]
    for prepared, params in zip(submission.prepared, evaluated, strict=True):
        assert params is prepared["params"]
    by_step = {u["step"]: u for u in submission.updates}
    for prepared in submission.prepared[:-1]:
        following = by_step[prepared["step"]]  # global_step of the next call == eval step
        assert following["params"] is prepared["params"]
        assert following["optimizer_state"]["marked_at"] == prepared["step"]


def test_prepare_for_eval_time_is_submission_time_eval_time_is_not():
    workload = ScriptedDiabetes([1.0] * 9, [1.0] * 9, eval_sleep=0.4)
    submission = Recording(prepare_sleep=0.15, mark=False)
    result = run_training(
        workload,
        submission,
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=9, eval_every_steps=4, stop_at_target=False),
    )
    assert [e.global_step for e in result.evals] == [1, 5, 9]
    assert result.total_submission_time >= 3 * 0.15
    # Had the three 0.4 s evals been billed, this would exceed 1.65 s.
    assert result.total_submission_time < 3 * 0.15 + 0.7
    assert result.evals[-1].metrics["accumulated_eval_time"] >= 3 * 0.4
    for record in result.evals:
        assert record.metrics["score"] == record.accumulated_submission_time
        assert record.metrics["accumulated_submission_time"] == record.accumulated_submission_time


def test_stops_once_validation_and_test_targets_are_both_reached():
    # validation target 0.75 (first beaten at eval 3), test target 0.85 (at eval 5).
    script_val = [1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7]
    script_test = [1.0, 0.9, 0.9, 0.86, 0.8, 0.8, 0.8]
    workload = ScriptedDiabetes(script_val, script_test)
    result = run_training(
        workload,
        Recording(mark=False),
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=100, eval_every_steps=2),
    )
    assert [e.global_step for e in result.evals] == [1, 3, 5, 7, 9]
    assert result.stop_reason == "target" and result.total_steps == 9
    assert result.reached_target and result.reached_test_target
    assert result.steps_to_target == 5
    assert result.time_to_target == result.evals[2].accumulated_submission_time
    assert result.best_metric == 0.7 and result.direction == "min"

    unstopped = run_training(
        ScriptedDiabetes(script_val, script_test),
        Recording(mark=False),
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=12, eval_every_steps=2, stop_at_target=False),
    )
    assert unstopped.total_steps == 12 and unstopped.steps_to_target == 5


def test_time_budget_ends_the_run_without_evals_past_it():
    class Slow(Recording):
        def update_params(self, *args, **kwargs):
            time.sleep(0.06)
            return super().update_params(*args, **kwargs)

    result = run_training(
        "diabetes",
        Slow(mark=False),
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=1000, eval_every_steps=2, max_runtime_sec=0.5),
    )
    assert result.stop_reason == "time_budget"
    assert result.total_submission_time >= 0.5
    assert 5 <= result.total_steps < 20
    assert all(e.accumulated_submission_time < 0.5 for e in result.evals)


# ---- outputs ------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_outputs_match_algoperf_layout_and_are_written_atomically(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    out = tmp_path / "digits_pytorch" / "trial_1"
    result = run_training(
        "digits",
        TorchSGD(batch_size=64),
        HPARAMS,
        framework="pytorch",
        config=LoopConfig(max_steps=7, eval_every_steps=5, stop_at_target=False),
        output_dir=out,
    )
    with open(FIXTURES / "algoperf_v06_mnist_jax_eval_measurements.csv", newline="") as file:
        algoperf_header = next(csv.reader(file))
    with open(out / "eval_measurements.csv", newline="") as file:
        our_header = next(csv.reader(file))
    assert our_header == algoperf_header  # same metrics (accuracy, loss), same layout

    rows = _read_csv(out / "eval_measurements.csv")
    assert [int(r["global_step"]) for r in rows] == [1, 6, 7]
    for row, record in zip(rows, result.evals, strict=True):
        assert int(row["preemption_count"]) == 0
        assert float(row["validation/accuracy"]) == record.metrics["validation/accuracy"]
        assert float(row["accumulated_submission_time"]) == record.accumulated_submission_time
        assert int(row["validation/num_examples"]) == 300

    evals_written = [src for src, dst in replaced if dst == "eval_measurements.csv"]
    assert len(evals_written) == 3 and all(src != dst for src, dst in replaced)
    checkpoints_written = [dst for _, dst in replaced if dst.startswith("checkpoint_")]
    assert checkpoints_written == ["checkpoint_1", "checkpoint_6", "checkpoint_7", "checkpoint_7"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left

    measurements = _read_csv(out / "measurements.csv")
    train_rows = [r for r in measurements if r["loss"]]
    assert [int(r["global_step"]) for r in train_rows] == list(range(7))
    assert measurements[-1]["score"] and not measurements[-1]["validation/accuracy"]
    assert [m["global_step"] for m in result.train_metrics] == list(range(7))

    assert json.loads((out / "hparams.json").read_text()) == HPARAMS
    meta = json.loads((out / "meta_data_0.json").read_text())
    fingerprint = make_workload("digits", "pytorch").dataset_fingerprint
    assert meta["dataset"] == fingerprint.as_dict()
    assert meta["workload.dataset_sha256"] == fingerprint.sha256
    assert meta["workload.validation_target_value"] == result.validation_target
    assert meta["framework"] == "pytorch" and meta["versions"]["torch"] == torch.__version__
    assert meta["rng_seed"] == 0
    flags = json.loads((out / "flags_0.json").read_text())
    assert flags["workload"] == "digits" and flags["max_global_steps"] == 7
    assert result.dataset == fingerprint and result.output_dir == os.fspath(out)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint_")) == ["checkpoint_7"]


def test_bad_inputs_fail_clearly(tmp_path):
    class Incomplete:
        def get_batch_size(self, name):
            return 32

    with pytest.raises(ValueError, match=r"lacks AlgoPerf function.*init_optimizer_state"):
        run_training("diabetes", Incomplete(), None, framework="pytorch")
    with pytest.raises(ValueError, match="jax twin but framework='pytorch'"):
        run_training(make_workload("diabetes", "jax"), TorchSGD(), None, framework="pytorch")
    with pytest.raises(ValueError, match=r"global batch size \(12\).*number of devices \(8\)"):
        run_training("diabetes", TorchSGD(batch_size=12), None, framework="jax")
    with pytest.raises(ValueError, match="max_steps=0"):
        LoopConfig(max_steps=0)
    with pytest.raises(ValueError, match="resume=True needs the output_dir"):
        run_training("diabetes", TorchSGD(), None, framework="pytorch", resume=True)
    config = LoopConfig(max_steps=2, eval_every_steps=1)
    run_training(
        "diabetes", TorchSGD(), HPARAMS, framework="pytorch", config=config, output_dir=tmp_path
    )
    with pytest.raises(loop.OutputDirectoryInUseError, match="resume=True"):
        run_training(
            "diabetes", TorchSGD(), HPARAMS, framework="pytorch", config=config, output_dir=tmp_path
        )


# ---- checkpoints and resume -----------------------------------------------------------------


def _strip_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIME_KEYS}


def _final_params(framework: str, submission) -> dict[str, np.ndarray]:
    if framework == "pytorch":
        return {k: v.numpy() for k, v in submission.final_state.items()}
    import jax

    flat = jax.tree_util.tree_flatten_with_path(submission.final_params)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_resumed_run_continues_bit_for_bit(tmp_path, framework):
    make_sgd = TorchSGD if framework == "pytorch" else JaxSGD
    workload = make_workload("digits", framework)  # BatchNorm and dropout are exercised
    config = LoopConfig(max_steps=17, eval_every_steps=5, stop_at_target=False, rng_seed=3)

    reference = make_sgd(batch_size=64)
    whole = run_training(
        workload,
        reference,
        HPARAMS,
        framework=framework,
        config=config,
        output_dir=tmp_path / "whole",
    )

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Crash):
        run_training(
            workload,
            make_sgd(batch_size=64, crash_at=13),
            HPARAMS,
            framework=framework,
            config=config,
            output_dir=interrupted,
        )
    assert sorted(p for p in os.listdir(interrupted) if p.startswith("checkpoint_")) == [
        "checkpoint_11"
    ]
    lines = []
    resumed_submission = make_sgd(batch_size=64)
    resumed = run_training(
        workload,
        resumed_submission,
        HPARAMS,
        framework=framework,
        config=config,
        output_dir=interrupted,
        resume=True,
        progress=lines.append,
    )
    assert "resumed" in lines[0] and "step 11" in lines[0]

    assert [e.global_step for e in resumed.evals] == [e.global_step for e in whole.evals]
    assert [e.global_step for e in whole.evals] == [1, 6, 11, 16, 17]
    assert [e.preemption_count for e in resumed.evals] == [0, 0, 0, 1, 1]
    for ours, theirs in zip(resumed.evals, whole.evals, strict=True):
        assert _strip_times(ours.metrics) == _strip_times(theirs.metrics)
    ours, theirs = _final_params(framework, resumed_submission), _final_params(framework, reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # Submission time carries over from the checkpoint.
    assert (
        resumed.evals[3].accumulated_submission_time > resumed.evals[2].accumulated_submission_time
    )
    rows = _read_csv(interrupted / "eval_measurements.csv")
    assert [int(r["global_step"]) for r in rows] == [1, 6, 11, 16, 17]
    assert (interrupted / "meta_data_1.json").exists()

    latest = interrupted / "checkpoint_17"
    if framework == "pytorch":
        saved = torch.load(latest, weights_only=False)
        assert set(saved["optimizer_state"]) == {"velocity"}  # state_dict() of each value
        assert set(saved["model_params"]) >= {"bn1.running_mean", "dense1.weight"}
    else:
        with open(latest, "rb") as file:
            saved = pickle.load(file)
        assert (
            len(saved["optimizer_state"]["leaves"])
            == len(__import__("jax").tree_util.tree_leaves(resumed_submission.final_params)) + 1
        )


@pytest.mark.parametrize("framework", ["pytorch", "jax"])
def test_a_truncated_checkpoint_is_named_in_the_error(tmp_path, framework):
    make_sgd = TorchSGD if framework == "pytorch" else JaxSGD
    workload = make_workload("diabetes", framework)
    config = LoopConfig(max_steps=9, eval_every_steps=5, stop_at_target=False, rng_seed=3)
    with pytest.raises(Crash):
        run_training(
            workload,
            make_sgd(batch_size=32, crash_at=8),
            HPARAMS,
            framework=framework,
            config=config,
            output_dir=tmp_path,
        )
    (checkpoint,) = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint_")]
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(loop.UnreadableCheckpointError, match=str(checkpoint)):
        run_training(
            workload,
            make_sgd(batch_size=32),
            HPARAMS,
            framework=framework,
            config=config,
            output_dir=tmp_path,
            resume=True,
        )


def test_a_jax_checkpoint_of_another_layout_names_where_it_differs():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from polyak.workloads.loop_jax import (
        CheckpointMismatchError,
        _numpy_into_tree,
        _tree_to_numpy,
    )

    # Wide enough that two whole tree definitions would run to thousands of characters.
    params = {f"layer_{i:02d}": {"kernel": jnp.zeros(()), "bias": jnp.zeros(())} for i in range(40)}
    older = {"averaging": {"count": jnp.zeros(()), "total": jnp.ones(3)}, "params": params}
    newer = {"averaging": {"count": jnp.zeros(())}, "params": params}
    saved = _tree_to_numpy(older)
    with pytest.raises(CheckpointMismatchError, match="82 leaves against 81") as caught:
        _numpy_into_tree(saved, newer, "optimizer_state")
    message = str(caught.value)
    assert "'total'" in message  # the checkpoint's side of the first difference
    assert len(message) < 600  # not two whole tree definitions
    restored = _numpy_into_tree(saved, older, "optimizer_state")
    assert float(restored["averaging"]["total"][0]) == 1.0
