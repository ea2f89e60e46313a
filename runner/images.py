"""The job's image: built on the laptop (or pinned by digest), identified by content.

A run is reproducible only if we know exactly which image it used, so every image is
recorded by its ID (the config digest) and, where a registry knows it, its repo digest.
The base image named in the Dockerfile's FROM is resolved the same way and written to the
job's lock file next to the spec: committed with the spec, `git diff` shows when the base moved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import BadInput, ProviderFailure, RunFailed
from runner.files import write_json_atomic
from runner.spec import LoadedSpec

if TYPE_CHECKING:
    from runner.layer_sources import RegistrySource

LogSink = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    """One image as the engine knows it."""

    ref: str
    id: str
    repo_digests: tuple[str, ...] = ()
    size: int = 0
    layers: tuple[str, ...] = ()  # the diff IDs of its layers, bottom first

    @property
    def pinned(self) -> str:
        """The most portable exact reference: a repo digest if any, else the image ID."""
        return self.repo_digests[0] if self.repo_digests else self.id


@dataclass(frozen=True)
class ResolvedImage:
    """The job's image and, when it was built, the base it was built on."""

    image: ImageInfo
    base: ImageInfo | None = None
    build_args: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def docker_client():
    """A client for the local engine, or a one-line error saying why there is none."""
    from docker.errors import DockerException

    import docker

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except DockerException as exc:
        raise ProviderFailure(
            f"cannot reach the Docker engine ({_first_line(exc)}); is dockerd running?"
        ) from None
    return client


@contextmanager
def engine_errors(doing: str) -> Iterator[None]:
    """Turn the Docker SDK's and its HTTP layer's errors into one-line provider failures."""
    from docker.errors import DockerException, ImageNotFound
    from requests.exceptions import RequestException

    try:
        yield
    except ImageNotFound:
        raise
    except (DockerException, RequestException) as exc:
        raise ProviderFailure(f"Docker engine failed while {doing}: {_first_line(exc)}") from None


def resolve_image(loaded: LoadedSpec, log: LogSink) -> ResolvedImage:
    """Build the spec's image or check its pinned reference; return what it resolved to."""
    client = docker_client()
    image_spec = loaded.spec.image
    if image_spec.ref is not None:
        return ResolvedImage(image=_pinned(client, image_spec.ref))
    build = image_spec.build
    context = loaded.resolve(build.context)
    dockerfile = (context / build.dockerfile).resolve()
    tag = build.tag or f"runner/{loaded.spec.name}:latest"
    image = _build(client, context, dockerfile, dict(build.args), tag, log)
    base_ref = base_image_ref(dockerfile.read_text(encoding="utf-8"), dict(build.args))
    base = _inspect_base(client, base_ref, log) if base_ref else None
    return ResolvedImage(image=image, base=base, build_args=dict(build.args))


def require_pinned_id(loaded: LoadedSpec) -> None:
    """Refuse a spec that pins an image ID the engine lacks before any run is recorded for it
    (a reference by digest may still be pulled at plan)."""
    ref = loaded.spec.image.ref
    if ref is not None and ref.startswith("sha256:"):
        _pinned(docker_client(), ref)


def _pinned(client, ref: str) -> ImageInfo:
    from docker.errors import ImageNotFound

    try:
        with engine_errors("looking up the pinned image"):
            return _inspect(client, ref)
    except ImageNotFound:
        pass
    if ref.startswith("sha256:"):
        raise BadInput(f"image {ref} is not in the local engine; build it or `docker load` it, then retry")
    with engine_errors(f"pulling the pinned image {ref}"):
        client.images.pull(ref)
        return _inspect(client, ref)


def _inspect_base(client, ref: str, log: LogSink) -> ImageInfo | None:
    """The base image as the engine has it after the build, or None when it cannot say
    (e.g. a FROM line with syntax this reader does not expand)."""
    from docker.errors import DockerException

    try:
        return _inspect(client, ref)
    except DockerException as exc:
        log(f"base image {ref} not recorded: {_first_line(exc)}")
        return None


def _inspect(client, ref: str) -> ImageInfo:
    attrs = client.api.inspect_image(ref)
    return ImageInfo(
        ref=ref,
        id=attrs["Id"],
        repo_digests=tuple(attrs.get("RepoDigests") or ()),
        size=int(attrs.get("Size") or 0),
        layers=tuple((attrs.get("RootFS") or {}).get("Layers") or ()),
    )


def _build(
    client, context: Path, dockerfile: Path, args: dict[str, str], tag: str, log: LogSink
) -> ImageInfo:
    with engine_errors("building the image"):
        image_id = _stream_build(client, context, dockerfile, args, tag, log)
    with engine_errors("inspecting the built image"):
        return _inspect(client, image_id or tag)


def _stream_build(
    client, context: Path, dockerfile: Path, args: dict[str, str], tag: str, log: LogSink
) -> str | None:
    """Run the build, sending its output lines to log; the built image's ID if the engine said."""
    image_id = None
    stream = client.api.build(
        path=str(context),
        dockerfile=str(dockerfile),
        buildargs=args,
        tag=tag,
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            raise RunFailed(f"image build failed: {chunk['error'].strip()}")
        text = chunk.get("stream", "")
        for line in text.splitlines():
            if line.strip():
                log(line.rstrip())
        image_id = chunk.get("aux", {}).get("ID", image_id)
    return image_id


_ARG = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def base_image_ref(dockerfile_text: str, build_args: dict[str, str]) -> str | None:
    """The image the Dockerfile's final stage starts from, with ARGs substituted.

    Returns None for `FROM scratch` or when the final stage builds on an earlier stage.
    """
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    base = None
    for line in _instructions(dockerfile_text):
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ARG" and base is None:
            name, _, value = rest.strip().partition("=")
            defaults[name.strip()] = value.strip().strip('"')
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            base = _substitute(parts[0], {**defaults, **build_args})
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2].lower())
    if base is None or base == "scratch" or base.lower() in stages:
        return None
    return base


def _substitute(text: str, values: dict[str, str]) -> str:
    return _ARG.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _instructions(text: str) -> list[str]:
    """Dockerfile lines with comments dropped and continuations joined."""
    joined = re.sub(r"\\\s*\n", " ", text)
    return [s.strip() for s in joined.splitlines() if s.strip() and not s.strip().startswith("#")]


def lock_path(loaded: LoadedSpec) -> Path:
    return loaded.path.with_name(loaded.path.stem + ".lock.json")


def write_lock(loaded: LoadedSpec, resolved: ResolvedImage, registry: RegistrySource | None = None) -> Path:
    """Record the images a job resolved to next to its spec (atomically), and the manifest
    digest its base resolved to at the registry (when it was looked up there)."""
    path = lock_path(loaded)
    payload = {
        "job": loaded.spec.name,
        "spec_sha256": loaded.sha256,
        "image": asdict(resolved.image),
        "base": asdict(resolved.base) if resolved.base else None,
        "build_args": resolved.build_args,
        "registry": registry.to_lock() if registry is not None else None,
    }
    write_json_atomic(path, payload)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
