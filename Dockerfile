# polyak on AlgoPerf v0.6: one image per framework, GPU build of that framework.
#
#   docker build -t polyak:pytorch --build-arg framework=pytorch .
#   docker build -t polyak:jax --build-arg framework=jax .
#
# The entrypoint runs one (or more) AlgoPerf workloads through polyak's runner,
# which launches AlgoPerf's submission_runner with python or torchrun:
#
#   docker run --rm --gpus=all --ipc=host \
#     -v $HOME/data:/data -v $HOME/experiment_runs:/experiment_runs \
#     polyak:pytorch --workloads=ogbg --framework=pytorch --submission=nadamw \
#     --data_dir=/data --experiment_dir=/experiment_runs --experiment_name=nadamw_study_1 \
#     --tuning_ruleset=external --tuning_search_space=tuning_search_spaces/nadamw.json \
#     --num_tuning_trials=5 --launcher=torchrun --nproc_per_node=8
#
# (scripts/run_workloads.py --launcher=docker prints exactly this command.)

ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
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

RUN mkdir -p /data /experiment_runs

ENTRYPOINT ["python", "scripts/run_workloads.py", "--suite=algoperf"]
CMD ["--help"]
