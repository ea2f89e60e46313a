# The trainer image: PyTorch, SentencePiece, safetensors and the `trainer` package, nothing else.
#
# BASE_IMAGE is pinned by tag; runner records the digest it resolved to in the job's lock file
# and in every run manifest. Layers go from least to most often changed, so editing the
# trainer's code rebuilds only the last one (a few hundred KB to ship, not gigabytes).
# PIP_EXTRA_ARGS lets a build use a nearby package mirror, e.g. "--index-url https://...".
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
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
