"""Test images that belong to one test session."""

from __future__ import annotations

import io
import os


def build_own_image(client, dockerfile: str, name: str) -> str:
    """Build dockerfile as name:<pid> and return its ID. The build cache gives two sessions that
    build the same Dockerfile the same image ID, and a fixture's teardown removes its image by
    ID: the session label makes each session's ID its own, so one never removes another's."""
    labelled = f"{dockerfile.rstrip()}\nLABEL runner.test.session={os.getpid()}\n"
    built, _ = client.images.build(
        fileobj=io.BytesIO(labelled.encode()), tag=f"{name}:{os.getpid()}", rm=True
    )
    return built.id
