"""AlgoPerf's ``spec`` types, from algoperf when installed, else a local twin.

polyak must import and pass its tests without algoperf (it is not on PyPI).
The local definitions carry the same names and enum values as algoperf v0.6's
``algoperf.spec``, so code written against one runs against the other.
"""

from __future__ import annotations

import abc
import enum
from typing import Any

try:  # pragma: no cover - exercised only where algoperf is installed
    from algoperf.spec import (  # type: ignore[import-not-found]
        ForwardPassMode,
        LossType,
        ParameterType,
        ShapeTuple,
        TrainingCompleteError,
        Workload,
    )

    HAVE_ALGOPERF = True
except ImportError:
    HAVE_ALGOPERF = False

    class _PortableEnum(enum.Enum):
        """Members equal any same-named twin, such as a vendored copy of this module.

        An exported submission carries its own copy of this file; without
        algoperf, its ``ForwardPassMode.TRAIN`` must still equal the one a
        workload compares against.
        """

        def __eq__(self, other: object) -> bool:
            return (
                isinstance(other, enum.Enum)
                and type(other).__name__ == type(self).__name__
                and other.name == self.name
            )

        def __hash__(self) -> int:
            return hash((type(self).__name__, self.name))

    class LossType(_PortableEnum):  # type: ignore[no-redef]
        SOFTMAX_CROSS_ENTROPY = 0
        SIGMOID_CROSS_ENTROPY = 1
        MEAN_SQUARED_ERROR = 2
        CTC_LOSS = 3
        MEAN_ABSOLUTE_ERROR = 4

    class ForwardPassMode(_PortableEnum):  # type: ignore[no-redef]
        TRAIN = 0
        EVAL = 1

    class ParameterType(_PortableEnum):  # type: ignore[no-redef]
        WEIGHT = 0
        BIAS = 1
        CONV_WEIGHT = 2
        BATCH_NORM_SCALE = 3
        BATCH_NORM_BIAS = 4
        LAYER_NORM_SCALE = 5
        LAYER_NORM_BIAS = 6
        EMBEDDING = 7
        ATTENTION_Q = 8
        ATTENTION_K = 9
        ATTENTION_V = 10
        ATTENTION_OUT = 11
        ATTENTION_QKV = 12
        ATTENTION_KV = 13
        ATTENTION_BIAS = 14

    class ShapeTuple:  # type: ignore[no-redef]
        def __init__(self, shape_tuple: tuple[int, ...]) -> None:
            self.shape_tuple = tuple(shape_tuple)

        def __repr__(self) -> str:
            return f"ShapeTuple({self.shape_tuple})"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, ShapeTuple) and self.shape_tuple == other.shape_tuple

    class TrainingCompleteError(Exception):  # type: ignore[no-redef]
        pass

    class Workload(metaclass=abc.ABCMeta):  # type: ignore[no-redef]  # noqa: B024
        """The part of algoperf's Workload base class that submissions touch."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            del args, kwargs
            self._param_shapes: Any = None
            self._param_types: Any = None
            self._eval_iters: dict[str, Any] = {}
            self.metrics_logger: Any = None

        def attach_metrics_logger(self, metrics_logger: Any) -> None:
            self.metrics_logger = metrics_logger

        @property
        def param_shapes(self) -> Any:
            if self._param_shapes is None:
                raise ValueError("init_model_fn() must be called before param_shapes")
            return self._param_shapes

        @property
        def model_params_types(self) -> Any:
            if self._param_types is None:
                raise ValueError("init_model_fn() must be called before model_params_types")
            return self._param_types


__all__ = [
    "HAVE_ALGOPERF",
    "ForwardPassMode",
    "LossType",
    "ParameterType",
    "ShapeTuple",
    "TrainingCompleteError",
    "Workload",
]
