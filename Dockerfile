# The trainer image: PyTorch, SentencePiece, safetensors and the `trainer` package, nothing else.
#
# BASE_IMAGE is pinned by tag; runner records the digest it resolved to in the job's lock file
# and in every run manifest. Layers go from least to most often changed, so editing the
# trainer's code rebuilds only the last one (a few hundred KB to ship, not gigabytes).
# PIP_EXTRA_ARGS lets a build use a nearby package mirror, e.g. "--index-url https://...".
#
# The base's torch is the minor version the test suite runs (tests/trainer/test_one_torch.py
# checks it). CUDA 12.8 builds cover sm_80 (A100/A800), sm_86/sm_89 (RTX 3090/4090, L20, L40S),
# sm_90 (H100/H800/H200/H20) and sm_120 (RTX 5090), and run on drivers from 525 on for all but
# Blackwell, which needs 570 or later in any case; CUDA 13 builds would need driver 580.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG PIP_EXTRA_ARGS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/trainer
WORKDIR /data

COPY requirements/trainer.txt /opt/trainer/requirements.txt
RUN python -m pip install ${PIP_EXTRA_ARGS} -r /opt/trainer/requirements.txt

COPY trainer /opt/trainer/trainer
