"""Finding the base image a Dockerfile builds on (recorded in the lock file and manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.images import base_image_ref

pytestmark = pytest.mark.unit


def test_arg_default_and_override():
    text = "ARG BASE_IMAGE=pytorch/pytorch:2.5.1\nFROM ${BASE_IMAGE}\nRUN true\n"
    assert base_image_ref(text, {}) == "pytorch/pytorch:2.5.1"
    assert base_image_ref(text, {"BASE_IMAGE": "local/base:1"}) == "local/base:1"


def test_final_stage_wins_and_stage_names_are_not_images():
    text = "FROM golang:1.22 AS build\nRUN make\nFROM debian:12-slim\nCOPY --from=build /x /x\n"
    assert base_image_ref(text, {}) == "debian:12-slim"
    assert base_image_ref("FROM alpine AS base\nFROM base\n", {}) is None
    assert base_image_ref("FROM scratch\n", {}) is None


def test_comments_continuations_and_platform_flags():
    text = "# FROM wrong\nFROM --platform=linux/amd64 \\\n  python:3.11-slim\n"
    assert base_image_ref(text, {}) == "python:3.11-slim"


def test_the_project_dockerfile_pins_a_tag_not_latest():
    dockerfile = Path(__file__).parents[2] / "Dockerfile"
    ref = base_image_ref(dockerfile.read_text(encoding="utf-8"), {})
    assert ref.startswith("pytorch/pytorch:") and not ref.endswith(":latest")
