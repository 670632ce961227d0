"""The optimizers' self-tuning defaults are the first points of their shipped search spaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyak.optim.nadamw_config import NadamWConfig
from polyak.optim.shampoo_config import ShampooConfig

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "tuning_search_spaces"


@pytest.mark.parametrize(
    ("config_type", "search_space"),
    [(NadamWConfig, "nadamw.json"), (ShampooConfig, "shampoo.json")],
)
def test_defaults_are_the_first_point_of_the_search_space(config_type, search_space) -> None:
    first_point = json.loads((SEARCH_SPACES / search_space).read_text())[0]
    defaults = config_type.DEFAULT_HYPERPARAMETERS
    assert {name: defaults[name] for name in first_point} == first_point
    # Reading the point back gives the config that reading nothing gives.
    assert config_type.from_hyperparameters(first_point) == config_type.from_hyperparameters(None)
