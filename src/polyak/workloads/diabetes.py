"""The ``diabetes`` workload, framework-free: scikit-learn's diabetes regression.

442 patients with 10 raw features, split 266 / 88 / 88 (train / validation /
test) with a fixed permutation. Inputs and the target (disease progression)
are standardized with training statistics. The model is a small MLP; the loss
is mean squared error; the target metric is ``mse`` on standardized targets
(lower is better, compared with ``<`` as AlgoPerf does for loss-like metrics).

Wider or deeper MLPs overfit the 266 training rows within a few hundred
steps, so the model has one hidden layer of 16 units.

Targets and ``step_hint`` come from ``calibration/diabetes.json``, written by
``scripts/calibrate_workloads.py`` (NadamW, no averaging, median over seeds
of the best validation and test mse within ``step_hint``). The time budget
is generous because a shared CPU box can slow everything down severalfold;
runs that reach the targets stop there anyway.
"""

from __future__ import annotations

from polyak.algoperf import spec
from polyak.workloads.base import EmbeddedWorkload
from polyak.workloads.calibration import CalibratedValue


class BaseDiabetesWorkload(EmbeddedWorkload):
    workload_name = "diabetes"
    dataset_name = "diabetes"
    hidden_widths = (16,)
    num_outputs = 1
    use_batch_norm = False
    _target_metric = "mse"
    _higher_is_better = False
    _validation_target = CalibratedValue("validation_target")
    _test_target = CalibratedValue("test_target")
    _step_hint = CalibratedValue("step_hint")
    _max_allowed_runtime_sec = 120
    _eval_period_steps = 10
    _eval_period_time_sec = 1
    _eval_batch_size = 128
    _recommended_batch_size = 32

    @property
    def loss_type(self) -> spec.LossType:
        return spec.LossType.MEAN_SQUARED_ERROR
