"""Global batch sizes per workload: AlgoPerf's baseline values, plus ours."""

from __future__ import annotations

# AlgoPerf v0.6's NAdamW baseline (algorithms/baselines/external_tuning).
ALGOPERF_BATCH_SIZES: dict[str, int] = {
    "criteo1tb": 262_144,
    "fastmri": 32,
    "imagenet_resnet": 1024,
    "imagenet_resnet_silu": 512,
    "imagenet_resnet_gelu": 512,
    "imagenet_vit": 1024,
    "librispeech_conformer": 256,
    "librispeech_deepspeech": 256,
    "ogbg": 512,
    "wmt": 128,
    "mnist": 16,
}

# polyak's embedded CPU workloads (multiples of 8, so JAX can shard them over
# 8 devices).
EMBEDDED_BATCH_SIZES: dict[str, int] = {
    "digits": 64,
    "diabetes": 32,
    "textlm": 32,
}

BATCH_SIZES: dict[str, int] = {**ALGOPERF_BATCH_SIZES, **EMBEDDED_BATCH_SIZES}


def get_batch_size(workload_name: str) -> int:
    """The global batch size for ``workload_name`` (AlgoPerf's signature)."""
    try:
        return BATCH_SIZES[workload_name]
    except KeyError:
        raise ValueError(
            f"unsupported workload {workload_name!r}; expected one of {sorted(BATCH_SIZES)}"
        ) from None
