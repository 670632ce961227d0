"""Runs submissions through the local loop for a few steps, in a fresh process.

Usage: python export_driver.py FRAMEWORK OUT_JSON (exported|repo) PATH...

``exported`` runs AlgoPerf-style folders made by the exporter. The loop and
the workload come from polyak, but polyak's optimizers, averaging and
builders are refused, so the folder can only use the code it carries.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from polyak.workloads.loop import LoopConfig, run_training
from polyak.workloads.registry import make_workload

STEPS = 4
FORBIDDEN = (
    "polyak.optim",
    "polyak.averaging",
    "polyak.algoperf.builder_torch",
    "polyak.algoperf.builder_jax",
    "polyak.algoperf.trial_config",
)


class RefuseNewPolyakImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(FORBIDDEN):
            raise ImportError(f"exported submission imported {name!r} from an installed polyak")
        return None


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    framework, out_json, source, *paths = sys.argv[1:]
    hyperparameters_by_path = {}
    workload = make_workload("diabetes", framework)
    if source == "exported":
        sys.meta_path.insert(0, RefuseNewPolyakImports())
    results = {}
    for i, path in enumerate(paths):
        folder = os.path.dirname(os.path.abspath(path))
        space = os.path.join(folder, "tuning_search_space.json")
        hyperparameters_by_path[path] = (
            json.loads(Path(space).read_text())[0] if os.path.exists(space) else None
        )
        for name in [m for m in sys.modules if m.startswith("polyak_vendored")]:
            del sys.modules[name]
        submission = load(path, f"submission_{i}")
        result = run_training(
            make_workload("diabetes", framework),
            submission,
            hyperparameters_by_path[path],
            framework=framework,
            config=LoopConfig(
                max_steps=STEPS, eval_every_steps=3, checkpoint=False, stop_at_target=False
            ),
        )
        results[path] = [
            [
                e.global_step,
                {k: v for k, v in e.metrics.items() if k.startswith(("train/", "validation/"))},
            ]
            for e in result.evals
        ]
    if source == "exported":
        leaked = [m for m in sys.modules if m.startswith(FORBIDDEN)]
        assert not leaked, f"exported submissions used installed polyak modules: {leaked}"
    del workload
    with open(out_json, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
