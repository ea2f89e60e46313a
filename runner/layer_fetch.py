"""Have the instance fetch layers from a registry into its layer cache, as a detached step.

The fetch runs under the same supervisor as a job's steps (runner/steps.py), so a dropped SSH
link does not stop a multi-GB download: a later session finds the layers in the cache. The
registry credentials reach the fetcher as environment variables in its private command file,
never on a command line, and that folder is removed when the fetch ends.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from infra.base import Lines
from runner.errors import BadInput, ProviderFailure
from runner.layer_sources import RegistrySource
from runner.layers import RemoteLayout

if TYPE_CHECKING:
    from runner.steps import DetachedSteps, StepHandle

# The fetcher's network settings come from the login's environment on the host (its proxies).
INHERITED = ("PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
FETCH_TIMEOUT_S = 6 * 3600


@dataclass
class FetchOutcome:
    """What the instance fetched (diffID -> the source that served it), what it could not
    (diffID -> why: the laptop sends those), and the sources it dropped along the way."""

    fetched: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Fetch:
    handle: StepHandle
    plan_path: str
    diff_ids: tuple[str, ...]
    started: float


def start(steps: DetachedSteps, layout: RemoteLayout, source: RegistrySource, diff_ids: list[str]) -> Fetch:
    """Start fetching the layers (diffIDs the source serves) on the host; returns at once."""
    script = steps.ship("registry_fetch.py")
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    folder = f"{layout.data_dir}/runner/fetch/{name}"
    plan_path = f"{layout.data_dir}/runner/fetch/{name}.plan.json"
    steps.put_json(
        plan_path,
        {
            "sources": list(source.sources),
            "repository": source.repository,
            "dest": layout.layers_dir,
            "parallel": source.parallel,
            "layers": [{"diff_id": d, **_blob(source, d)} for d in diff_ids],
        },
    )
    handle = steps.launch(folder, ["python3", script, plan_path], source.credentials_env(), INHERITED)
    return Fetch(handle, plan_path, tuple(diff_ids), time.monotonic())


def finish(
    steps: DetachedSteps, fetch: Fetch, progress: Callable[[str, int, int], None] | None = None
) -> FetchOutcome:
    """Wait for the fetch, following its events; remove its folder (its command file holds
    the credentials). Refused credentials are BadInput, a blob corrupt twice ProviderFailure."""
    outcome = FetchOutcome()
    errors: list[str] = []

    def on_line(line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            errors.append(line.strip())  # a Python traceback, say: shown if the fetch fails
            return
        _record(event, outcome, errors, progress)

    lines = Lines(on_line)
    try:
        code = steps.wait(fetch.handle, FETCH_TIMEOUT_S, lines.feed)
        lines.flush()
    finally:
        _remove_folder(steps, fetch)
    outcome.seconds = round(time.monotonic() - fetch.started, 3)
    where = steps.host.endpoint.address
    if code == 2:
        raise BadInput(errors[0] if errors else f"the registry refused the credentials (fetch on {where})")
    if code != 0:
        reason = errors[-1] if errors else f"exit code {code}"
        raise ProviderFailure(f"fetching layers on {where} failed: {reason}")
    for diff_id in fetch.diff_ids:  # a layer the fetcher never reported counts as missing
        if diff_id not in outcome.fetched:
            outcome.missing.setdefault(diff_id, "the fetcher did not report it")
    return outcome


def forget(steps: DetachedSteps, fetch: Fetch) -> None:
    """After a failed sync: remove the fetch's folder (its command file holds the credentials)
    and leave the fetch to finish; the next sync finds its layers in the cache (a layer being
    fetched is locked, so a second fetch waits for it rather than writing it twice)."""
    with contextlib.suppress(Exception):  # the link may be what failed
        _remove_folder(steps, fetch)


def _remove_folder(steps: DetachedSteps, fetch: Fetch) -> None:
    steps.host.run(["rm", "-rf", "--", fetch.handle.step_dir, fetch.plan_path], timeout=60)


def _record(event: dict, outcome: FetchOutcome, errors: list[str], progress) -> None:
    kind = event.get("event")
    if kind == "progress" and progress is not None:
        progress(f"fetch {str(event['diff_id']).removeprefix('sha256:')[:12]}", event["done"], event["total"])
    elif kind == "fetched":
        # "cache": another fetch put it there meanwhile; to the sync it was on the instance
        outcome.fetched[event["diff_id"]] = "instance" if event["source"] == "cache" else event["source"]
        outcome.bytes_fetched += int(event.get("bytes", 0))
        outcome.missing.pop(event["diff_id"], None)
    elif kind == "missing":
        outcome.missing[event["diff_id"]] = event["reason"]
    elif kind == "dropped":
        outcome.dropped.append(f"{event['source']} {event['reason']}")
    elif kind == "error":
        errors.append(event["reason"])


def _blob(source: RegistrySource, diff_id: str) -> dict:
    blob = source.blobs[diff_id]
    return {"digest": blob.digest, "size": blob.size, "media_type": blob.media_type}
