"""`runner doctor [JOB]`: what this machine (and a job) needs before a run, checked one by one.

Each check says what it found and, when something is wrong, exactly what to do about it. The
checks read and ask, they never change anything, and they never print a credential: a token is
reported as set or not set, a key file by its path and mode.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from runner.config import autodl_token_env
from runner.errors import RunnerError

DISK_WARN_GIB = 20.0  # an image, a base model and checkpoints want room
DISK_FAIL_GIB = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        text = f"{self.status.upper():<5} {self.name}: {self.detail}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


def _checked(name: str, probe: Callable[[], Check]) -> Check:
    """A check whose probe failed in an unforeseen way is a failed check, not a crash."""
    try:
        return probe()
    except RunnerError as exc:
        return Check(name, "fail", exc.message)
    except Exception as exc:  # doctor must report every check, whatever one of them hits
        return Check(name, "fail", f"{type(exc).__name__}: {exc}")


def run_checks(job: Path | None, runs_dir: Path) -> list[Check]:
    checks = [
        _checked("python", _python),
        _checked("docker engine", _docker),
        _checked("state folder", _state),
        _checked("user config", _user_config),
        _checked("disk space", lambda: _disk(runs_dir)),
    ]
    if job is not None:
        checks.extend(_job_checks(job))
    return checks


def _python() -> Check:
    return Check("python", "ok", f"{'.'.join(map(str, sys.version_info[:3]))} at {sys.executable}")


def _docker() -> Check:
    from runner.images import docker_client

    try:
        client = docker_client()
    except RunnerError as exc:
        return Check(
            "docker engine",
            "fail",
            exc.message,
            "start it (`sudo systemctl start docker`, or scripts/ensure-docker)",
        )
    version = client.version().get("Version", "?")
    client.close()
    return Check("docker engine", "ok", f"version {version}")


def _state() -> Check:
    from runner.home import runner_home
    from runner.store import open_store

    home = runner_home()
    with open_store() as store:
        runs = len(store.list_runs(1_000_000))
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        return Check("state folder", "warn", f"{home} is mode {mode:o}", f"chmod 700 {home}")
    return Check("state folder", "ok", f"{home} (private, {runs} runs recorded)")


def _user_config() -> Check:
    from runner.config import config_path, load_user_config

    path = config_path()
    if not path.is_file():
        return Check("user config", "ok", f"none at {path} (optional)")
    config = load_user_config()
    return Check(
        "user config", "ok", f"{path}: rates for {', '.join(sorted(config.pricing)) or 'no provider'}"
    )


def _disk(runs_dir: Path) -> Check:
    folder = runs_dir if runs_dir.exists() else Path.cwd()
    free_gib = shutil.disk_usage(folder).free / 2**30
    detail = f"{free_gib:.1f} GiB free at {folder}"
    if free_gib < DISK_FAIL_GIB:
        return Check(
            "disk space", "fail", detail, "free some space: runs bring images, weights and checkpoints"
        )
    if free_gib < DISK_WARN_GIB:
        return Check(
            "disk space", "warn", detail, f"keep at least {DISK_WARN_GIB:g} GiB free for images and weights"
        )
    return Check("disk space", "ok", detail)


# -- a job's checks -------------------------------------------------------------------------


def _job_checks(job: Path) -> Iterator[Check]:
    from runner.spec import load_spec

    try:
        loaded = load_spec(job)
    except RunnerError as exc:
        details = "; ".join(exc.details[:3])
        yield Check(
            "job spec", "fail", f"{exc.message}{': ' + details if details else ''}", f"runner validate {job}"
        )
        return
    yield Check("job spec", "ok", f"{job}: '{loaded.spec.name}', provider {loaded.spec.provider.type}")
    spec = loaded.spec  # valid: its inputs and key file exist
    for name in sorted({name for part in (*spec.setup, spec.train) for name in part.secrets}):
        yield _env_check(f"secret {name}", name, "the job names it in `secrets`")
    yield _checked("image", lambda: _image(loaded))
    yield from _provider_checks(loaded)


def _env_check(label: str, variable: str, why: str) -> Check:
    if os.environ.get(variable):
        return Check(label, "ok", f"${variable} is set (value not shown)")
    return Check(label, "fail", f"${variable} is not set ({why})", f"export {variable}=... in this shell")


def _image(loaded) -> Check:
    image = loaded.spec.image
    if image.build is not None:
        context = loaded.resolve(image.build.context)
        dockerfile = context / image.build.dockerfile
        if not dockerfile.is_file():
            return Check(
                "image", "fail", f"{dockerfile} does not exist", "fix image.build.context / dockerfile"
            )
        return Check("image", "ok", f"built from {dockerfile} at submit")
    from docker.errors import ImageNotFound

    from runner.images import docker_client

    client = docker_client()
    try:
        client.api.inspect_image(image.ref)
    except ImageNotFound:
        return Check(
            "image",
            "warn",
            f"{image.ref[:80]} is not in the local engine",
            "`docker pull`/`docker load` it first",
        )
    finally:
        client.close()
    return Check("image", "ok", f"{image.ref[:80]} is in the local engine")


def _provider_checks(loaded) -> Iterator[Check]:
    provider = loaded.spec.provider
    key_path = getattr(provider, "key_path", None)
    if key_path is not None:
        yield _checked("ssh key", lambda: _key(key_path))
    if getattr(provider, "password_env", None):
        yield _env_check("ssh password", provider.password_env, "provider.password_env names it")
    token_env = autodl_token_env(provider) if provider.type == "autodl" else None
    if token_env is not None:
        yield _env_check("autodl token", token_env, "the variable the AutoDL token is read from")
    if provider.type == "aws":
        yield _checked("aws credentials", _aws_credentials)
    if provider.type in ("autodl", "emulator") and (
        provider.type == "emulator" or os.environ.get(token_env or "")
    ):
        yield _checked(f"{provider.type} api", lambda: _instance_api(loaded))


def _key(path: Path) -> Check:
    import paramiko

    mode = stat.S_IMODE(path.stat().st_mode)
    try:
        paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        return Check(
            "ssh key",
            "fail",
            f"{path} needs a passphrase",
            "use a key without one, or an ssh-agent-free copy",
        )
    except (paramiko.SSHException, ValueError) as exc:
        return Check(
            "ssh key", "fail", f"{path} is not a private key runner can read ({exc})", "point key_file at it"
        )
    if mode & 0o077:
        return Check("ssh key", "warn", f"{path} is mode {mode:o}", f"chmod 600 {path}")
    return Check("ssh key", "ok", f"{path} (mode {mode:o})")


def _aws_credentials() -> Check:
    try:
        import boto3
    except ImportError:
        return Check("aws credentials", "fail", "boto3 is not installed", 'pip install "gpu-runner[aws]"')
    if boto3.Session().get_credentials() is None:
        return Check(
            "aws credentials",
            "fail",
            "none found",
            "set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        )
    return Check("aws credentials", "ok", "found (not shown)")


def _instance_api(loaded) -> Check:
    """One cheap call: the instance's state when the spec names one, else the balance."""
    from infra.registry import provider_for

    spec_provider = loaded.spec.provider
    name = f"{spec_provider.type} api"
    try:
        api = provider_for(spec_provider).api
    except RunnerError as exc:
        fix = "runner emulator up" if spec_provider.type == "emulator" else "check provider.url and the token"
        return Check(name, "fail", exc.message, fix)
    if spec_provider.instance:
        instance = api.describe(spec_provider.instance)
        return Check(name, "ok", f"instance {instance.id} is {instance.state.value}")
    balance = api.balance()
    return Check(name, "ok", "reachable" + (f", balance {balance:.2f}" if balance is not None else ""))
