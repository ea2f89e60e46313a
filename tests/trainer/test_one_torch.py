"""The trainer image runs the torch minor version the tests run, and the 7B job fetches the
base image the Dockerfile names."""

import re
from pathlib import Path

import pytest
import torch
import yaml

import trainer

REPO = Path(trainer.__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def dockerfile_base() -> str:
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    return base


def test_the_images_torch_is_the_tested_minor_version():
    tag = r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda(\d+)\.(\d+)-cudnn\d+-runtime"
    match = re.fullmatch(tag, dockerfile_base())
    assert match, dockerfile_base()
    image_minor = tuple(map(int, match.groups()[:2]))
    assert image_minor == tuple(int(part) for part in torch.__version__.split(".")[:2])
    assert tuple(map(int, match.groups()[2:])) >= (12, 8)  # the first CUDA with sm_120 (RTX 5090)


def test_the_7b_job_fetches_the_dockerfiles_base():
    job = yaml.safe_load((REPO / "jobs" / "llama7b-lora-zh.yaml").read_text())
    assert job["image"]["registry"]["base"] == dockerfile_base()
