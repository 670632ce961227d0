# polyak on AlgoPerf v0.6: one image per framework, GPU build of that framework.
#
#   docker build -t polyak:pytorch --build-arg framework=pytorch .
#   docker build -t polyak:jax --build-arg framework=jax .
#
# The entrypoint (docker/entrypoint.py) takes the flags of AlgoPerf's own
# docker/scripts/startup.sh, so AlgoPerf's scoring/utils/run_workloads.py can drive
# this image as it drives AlgoPerf's; data at /data/<dataset>, results in
# /experiment_runs, logs in /logs:
#
#   docker run --rm --gpus=all --ipc=host -v $HOME/data:/data \
#     -v $HOME/experiment_runs:/experiment_runs -v $HOME/experiment_runs/logs:/logs \
#     polyak:pytorch -d ogbg -f pytorch -s submissions/nadamw/pytorch/submission.py \
#     -w ogbg -e nadamw_nadamw_lawa/study_0 -t tuning_search_spaces/nadamw_lawa.json \
#     -o false --tuning_ruleset external --num_tuning_trials 5 --rng_seed 1 --nproc_per_node 4
#
# (scripts/run_workloads.py --launcher=docker prints such commands.) Any other flags
# go to polyak's runner: scripts/run_workloads.py --suite=algoperf <flags>.

# AlgoPerf's own docker/Dockerfile at the pinned commit builds on this CUDA/cuDNN
# image (cuDNN 9.x, as its jax_gpu extra needs), not on a 12.4 runtime image.
ARG CUDA_IMAGE=nvidia/cuda:12.9.0-cudnn-devel-ubuntu20.04
FROM ${CUDA_IMAGE}

# jax | pytorch: which framework gets the GPU build (the other one is installed
# for CPU, because AlgoPerf's submission_runner imports both).
ARG framework=pytorch
# AlgoPerf has no v0.6 tag; v0.6 is main at this commit.
ARG ALGOPERF_COMMIT=2c90454fc05d5bdf3598b0c7651e611f132a7060
ARG ALGOPERF_GIT_URL=https://github.com/mlcommons/algorithmic-efficiency.git

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (AlgoPerf needs >= 3.11), git for the pinned AlgoPerf install,
# ffmpeg for LibriSpeech, pigz for Criteo preprocessing.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        software-properties-common ca-certificates curl git ffmpeg pigz libtcmalloc-minimal4 \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel

# AlgoPerf at the pinned commit with the extras its own docker/Dockerfile uses:
# jax image: PyTorch CPU + all workloads, then JAX GPU;
# pytorch image: PyTorch GPU + JAX CPU + all workloads.
RUN set -eux; \
    if [ "$framework" = "jax" ]; then \
        pip install "algoperf[pytorch_cpu,full] @ git+${ALGOPERF_GIT_URL}@${ALGOPERF_COMMIT}" \
            --extra-index-url https://download.pytorch.org/whl/cpu; \
        pip install "algoperf[jax_gpu] @ git+${ALGOPERF_GIT_URL}@${ALGOPERF_COMMIT}"; \
    elif [ "$framework" = "pytorch" ]; then \
        pip install "algoperf[pytorch_gpu,jax_cpu,full] @ git+${ALGOPERF_GIT_URL}@${ALGOPERF_COMMIT}"; \
    else \
        echo "framework must be jax or pytorch, got '$framework'" >&2; exit 1; \
    fi; \
    python -c "import importlib.util as u; assert u.find_spec('algoperf') and u.find_spec('submission_runner')"

# polyak from this checkout. The frameworks are already installed (GPU build of
# one, CPU build of the other) and satisfy polyak's torch/jax extras as they are.
WORKDIR /workspace/polyak
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[torch,jax]"

# Submissions and search spaces stay as files: AlgoPerf imports
# --submission_path=submissions/<name>/<framework>/submission.py relative to
# this working directory.
COPY submissions ./submissions
COPY tuning_search_spaces ./tuning_search_spaces
COPY scripts ./scripts
COPY docker ./docker

RUN mkdir -p /data /experiment_runs /logs

ENTRYPOINT ["python", "docker/entrypoint.py"]
CMD ["--help"]
