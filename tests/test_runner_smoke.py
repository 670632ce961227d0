"""Smoke mode: synthetic batch shapes always; the real workloads only with algoperf."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.runner.errors import RunnerError
from polyak.runner.smoke import run_smoke, synthetic_batch


def test_synthetic_batches_have_algoperf_shapes():
    # Shapes as in AlgoPerf's tests/reference_algorithm_tests.py fake input queue.
    criteo = synthetic_batch("criteo1tb", "jax", 4)
    assert criteo["inputs"].shape == (4, 39) and criteo["targets"].shape == (4,)
    assert set(np.unique(criteo["targets"])) == {0.0, 1.0}
    assert synthetic_batch("imagenet_resnet", "jax", 2)["inputs"].shape == (2, 224, 224, 3)
    assert synthetic_batch("imagenet_vit", "pytorch", 2)["inputs"].shape == (2, 3, 224, 224)
    fastmri = synthetic_batch("fastmri", "pytorch", 3)
    assert fastmri["inputs"].shape == fastmri["targets"].shape == (3, 320, 320)
    assert fastmri["volume_max"].shape == (3,)
    speech = synthetic_batch("librispeech_conformer", "jax", 2)
    audio, audio_padding = speech["inputs"]
    tokens, token_padding = speech["targets"]
    assert audio.shape == audio_padding.shape == (2, 320_000)
    assert tokens.shape == token_padding.shape == (2, 256)
    assert tokens.min() >= 1 and tokens.max() < 1024
    # padding marks positions past each target length (lengths in [100, 256))
    assert (token_padding[:, :100] == 0).all() and (token_padding[:, -1] == 1).all()
    wmt = synthetic_batch("wmt", "jax", 2)
    assert wmt["inputs"].shape == wmt["targets"].shape == wmt["weights"].shape == (2, 256)
    with pytest.raises(RunnerError, match="ogbg"):
        synthetic_batch("ogbg", "jax", 2)


@pytest.mark.slow
def test_smoke_runs_our_submission_on_a_real_workload():
    pytest.importorskip("algoperf")
    results = run_smoke("ogbg", "jax", "nadamw", steps=1, out=lambda line: None)
    assert [r.ok for r in results] == [True], results[0].detail


def test_smoke_without_algoperf_says_how_to_install():
    try:
        import algoperf  # noqa: F401
    except ImportError:
        with pytest.raises(RunnerError, match="pip install"):
            run_smoke("ogbg", "jax", "nadamw", out=lambda line: None)
    else:
        pytest.skip("algoperf is installed")


def test_smoke_names_a_bad_submission_before_looking_for_algoperf():
    from polyak.runner.errors import UnknownSubmissionError

    with pytest.raises(UnknownSubmissionError, match="submission 'adamw' is neither a name"):
        run_smoke("ogbg", "jax", "adamw", out=lambda line: None)
