"""Where each layer of the job's image comes from: the instance has it, a registry serves it, or
the laptop sends it.

A trainer image is mostly its public base (CUDA, PyTorch: gigabytes); a laptop's uplink is
often 10-50 Mbit/s, the instance's data-centre link to a registry or a regional mirror ten
times that. So the base image is resolved here, before anything is booted (a manifest and a
config: a few KB), and every layer whose diffID the registry's image lists is fetched by the
instance itself (runner/remote_scripts/registry_fetch.py); only the project's own layers
travel from the laptop. Matching by diffID, not by name, means a base that moved since the
image was built simply matches fewer layers: nothing wrong is ever fetched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from runner.errors import BadInput
from runner.images import ImageInfo
from runner.remote_scripts import registry_fetch

SOURCE_INSTANCE = "instance"
SOURCE_LAPTOP = "laptop"


@dataclass(frozen=True)
class Blob:
    """A layer as the registry stores it: compressed, under its own digest."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class RegistrySource:
    """A resolved base image: where the instance may fetch which layers, and how to log in."""

    ref: str
    repository: str
    manifest_digest: str
    config_digest: str
    sources: tuple[str, ...]  # registry URLs, mirrors first
    blobs: dict[str, Blob]  # by diffID
    resolved_at: str  # the source that answered the resolution
    username_env: str | None = None
    password_env: str | None = None
    parallel: int = 4

    @property
    def name(self) -> str:
        return registry_fetch.parse_reference(self.ref)[0]

    def credentials_env(self) -> dict[str, str]:
        """REGISTRY_USER / REGISTRY_PASSWORD for the fetcher (empty without credentials)."""
        if self.username_env is None:
            return {}
        user, password = _credentials(self.username_env, self.password_env)
        return {"REGISTRY_USER": user, "REGISTRY_PASSWORD": password}

    def to_lock(self) -> dict:
        """What the job's lock file records (no credentials: only the variables' names)."""
        return {
            "ref": self.ref,
            "repository": self.repository,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "resolved_at": self.resolved_at,
            "sources": list(self.sources),
        }


def base_reference(image_spec, base: ImageInfo | None) -> str | None:
    """The image whose layers a registry may serve: image.registry.base if given; else the base
    the Dockerfile's FROM named, pinned by the registry digest the engine recorded when it
    pulled it (a base built or imported locally, with no registry in its name, has none: no
    registry is asked, nothing leaves this machine for it); else a pinned image.ref."""
    if image_spec.registry.base is not None:
        return image_spec.registry.base
    if base is not None:
        host, repository, _ = registry_fetch.parse_reference(base.ref)
        for digest in base.repo_digests:
            if registry_fetch.parse_reference(digest)[:2] == (host, repository):
                return digest
        if _names_registry(base.ref):
            return base.ref
        return base.repo_digests[0] if base.repo_digests else None
    if image_spec.ref is not None and "@" in image_spec.ref:
        return image_spec.ref
    return None


def _names_registry(ref: str) -> bool:
    first, slash, _ = ref.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def source_urls(ref: str, settings, provider_mirrors: list[str]) -> tuple[str, ...]:
    """The job's mirrors, then the provider's (user config), then the image's own registry;
    each once, in that order."""
    host, _, _ = registry_fetch.parse_reference(ref)
    upstream = registry_fetch.registry_url(host, list(settings.insecure))
    return tuple(dict.fromkeys([*(u.rstrip("/") for u in (*settings.mirrors, *provider_mirrors)), upstream]))


def resolve_source(
    image_spec, base: ImageInfo | None, provider_type: str, note: Callable[[str], None]
) -> RegistrySource | None:
    """Resolve the base image at its registries, or say in one line why every layer will come
    from the laptop (None). Refused credentials are an error: they will not fix themselves."""
    settings = image_spec.registry
    if not settings.enabled:
        return None
    ref = base_reference(image_spec, base)
    if ref is None:
        what = f"base image {base.ref} was made locally" if base is not None else "no base image"
        note(f"{what} (no registry knows it): the laptop sends every layer")
        return None
    from runner.config import load_user_config

    configured = load_user_config().registry.get(provider_type)
    sources = source_urls(ref, settings, list(configured.mirrors) if configured else [])
    credentials = (
        _credentials(settings.username_env, settings.password_env) if settings.username_env else None
    )
    try:
        found = registry_fetch.resolve(ref, list(sources), credentials)
    except registry_fetch.CredentialsRefused as exc:
        raise BadInput(str(exc)) from None
    except registry_fetch.RegistryError as exc:
        note(f"{exc}: the laptop sends every layer")
        return None
    for dropped in found["dropped"]:
        note(f"registry {dropped['source']} {dropped['reason']}; the next source answered")
    return RegistrySource(
        ref=ref,
        repository=found["repository"],
        manifest_digest=found["manifest_digest"],
        config_digest=found["config_digest"],
        sources=sources,
        blobs={
            layer["diff_id"]: Blob(layer["digest"], layer["size"], layer["media_type"])
            for layer in found["layers"]
        },
        resolved_at=found["source"],
        username_env=settings.username_env,
        password_env=settings.password_env,
        parallel=settings.parallel,
    )


def _credentials(username_env: str, password_env: str | None) -> tuple[str, str]:
    values = tuple(os.environ.get(name or "") for name in (username_env, password_env))
    for name, value in zip((username_env, password_env), values, strict=True):
        if not value:
            raise BadInput(f"registry credentials: environment variable {name} is not set")
    return values  # type: ignore[return-value]


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedLayer:
    """One layer of the image: its diffID, uncompressed size and where it will come from
    (SOURCE_INSTANCE, SOURCE_LAPTOP, or a registry's name); fetch_bytes is the blob's size."""

    diff_id: str
    size: int
    source: str
    fetch_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def plan_layers(
    diff_ids: tuple[str, ...], sizes: tuple[int, ...], registry: RegistrySource | None, present: set[str]
) -> list[PlannedLayer]:
    """Each distinct layer once, in image order, with its source."""
    planned: dict[str, PlannedLayer] = {}
    for diff_id, size in zip(diff_ids, sizes, strict=True):
        if diff_id in planned:
            continue
        blob = registry.blobs.get(diff_id) if registry is not None else None
        if diff_id in present:
            planned[diff_id] = PlannedLayer(diff_id, size, SOURCE_INSTANCE)
        elif blob is not None:
            planned[diff_id] = PlannedLayer(diff_id, size, registry.name, blob.size)
        else:
            planned[diff_id] = PlannedLayer(diff_id, size, SOURCE_LAPTOP)
    return list(planned.values())
