"""The trainer image's Dockerfile: a change to the trainer's code rebuilds only the top layer."""

from __future__ import annotations

import shutil

import pytest

from .conftest import BASE_IMAGE, REPO

pytestmark = pytest.mark.integration


def build(client, context, tag):
    image, _ = client.images.build(path=str(context), tag=tag, buildargs={"BASE_IMAGE": BASE_IMAGE}, rm=True)
    return image.attrs["RootFS"]["Layers"]


def test_code_change_rebuilds_only_the_last_layer(docker_engine, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "requirements", context / "requirements")
    shutil.copytree(REPO / "trainer", context / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    (context / "notes.txt").write_text("not for the image")
    tag = "runner-test/layering:latest"
    try:
        before = build(docker_engine, context, tag)
        with (context / "trainer" / "model.py").open("a") as handle:
            handle.write("\n# a code change\n")
        after = build(docker_engine, context, tag)
        base_layers = docker_engine.images.get(BASE_IMAGE).attrs["RootFS"]["Layers"]
        assert before[: len(base_layers)] == after[: len(base_layers)] == base_layers
        assert before[:-1] == after[:-1], "only the trainer code layer may change"
        assert before[-1] != after[-1]
        run = docker_engine.containers.run(
            tag,
            ["sh", "-c", "ls /opt/trainer; python -c 'import trainer.model, sentencepiece, safetensors'"],
            remove=True,
        )
        assert run.decode().split() == ["requirements.txt", "trainer"]
    finally:
        docker_engine.images.remove(tag, force=True)
