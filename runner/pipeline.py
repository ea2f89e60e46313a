"""The run's phase state machine: the only place that knows the order of phases.

Each phase is recorded in the store before it starts and after it ends, so `runner status`
always tells where a run is and why it stopped. Phases a provider has no use for are
recorded as skipped with the reason. Teardown runs whatever happened before it: nothing
the run started may outlive it.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from infra import instances
from infra.base import ContainerRun, Host, Instance, PowerMode, Provider
from infra.registry import provider_for
from runner import manifest
from runner.console import Reporter
from runner.errors import EXIT_OK, EXIT_RUN_FAILED, BadInput, RunFailed, RunnerError
from runner.files import sha256_file
from runner.images import ResolvedImage, resolve_image, write_lock
from runner.manifest import Artifact, InputRecord
from runner.spec import LoadedSpec, load_spec
from runner.store import Phase, Run, Store, open_store

PHASES = ("plan", "provision", "stage", "boot_gpu", "train", "collect", "teardown")
EXIT_INTERRUPTED = 130


@dataclass
class RunContext:
    """What the phases share while one run executes."""

    store: Store
    run: Run
    loaded: LoadedSpec
    run_dir: Path
    provider: Provider
    reporter: Reporter
    host: Host | None = None
    instance_id: str | None = None  # the rented instance, once acquired
    instance_created: bool = False
    image: ResolvedImage | None = None
    inputs: list[InputRecord] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    failed: bool = False

    def log_sink(self, log_name: str, source: str, *, echo: bool = True) -> Callable[[str], None]:
        """A callback that appends a line to logs/<log_name> and, if echo, shows it on the terminal."""
        path = self.run_dir / "logs" / log_name
        handle = path.open("a", encoding="utf-8")
        self._open_logs.append(handle)

        def sink(line: str) -> None:
            handle.write(line + "\n")
            handle.flush()
            if echo:
                self.reporter.output(source, line)

        return sink

    def close_logs(self) -> None:
        for handle in self._open_logs:
            handle.close()
        self._open_logs.clear()

    def __post_init__(self) -> None:
        self._open_logs: list = []


@dataclass(frozen=True)
class RunResult:
    run: Run
    phases: list[Phase]
    artifacts: list[Artifact]

    @property
    def exit_code(self) -> int:
        return self.run.exit_code if self.run.exit_code is not None else EXIT_OK

    def to_dict(self) -> dict:
        return {
            "run_id": self.run.id,
            "status": self.run.status,
            "exit_code": self.exit_code,
            "error": self.run.error,
            "phases": [{"name": p.name, "status": p.status, "seconds": p.seconds} for p in self.phases],
            "artifacts": [vars(a) for a in self.artifacts],
            "run_dir": self.run.run_dir,
        }


def submit(
    spec_path: str | Path, out_root: Path, reporter: Reporter, *, accept_new_host_key: bool = False
) -> RunResult:
    """Validate the spec, record a new run and drive it through every phase."""
    loaded = load_spec(spec_path)
    provider = provider_for(loaded.spec.provider, accept_new_host_key=accept_new_host_key)
    with open_store() as store:
        run_id = _new_run_id(loaded.spec.name)
        run_dir = _make_run_dir(out_root, run_id)
        run = Run(
            id=run_id,
            job_name=loaded.spec.name,
            spec_path=str(loaded.path),
            spec_sha256=loaded.sha256,
            provider=provider.type,
            run_dir=str(run_dir),
            status="running",
            created_at=time.time(),
        )
        store.create_run(run)
        store.add_event(run_id, "run.created", spec=str(loaded.path), provider=provider.type)
        reporter.info(f"run {run_id} -> {run_dir}")
        ctx = RunContext(store, run, loaded, run_dir, provider, reporter)
        with _signals_interrupt():
            return _execute(ctx)


def _execute(ctx: RunContext) -> RunResult:
    status, exit_code, error, unexpected = "succeeded", EXIT_OK, None, None
    try:
        for name in PHASES[:-1]:
            _run_phase(ctx, name)
    except RunnerError as exc:
        status, exit_code, error = "failed", exc.exit_code, exc.message
    except KeyboardInterrupt as exc:
        status, exit_code, error = "interrupted", EXIT_INTERRUPTED, f"interrupted ({exc or 'SIGINT'})"
    except Exception as exc:  # a bug or an unforeseen library error: record it, then let the CLI report it
        status, exit_code, error, unexpected = "failed", EXIT_RUN_FAILED, _internal(exc), exc
    with _signals_ignored():
        ctx.failed = status != "succeeded"
        teardown_error = _teardown_safely(ctx)
        if teardown_error and status == "succeeded":
            status, exit_code, error = "failed", teardown_error.exit_code, teardown_error.message
        ctx.close_logs()
        store = ctx.store
        store.finish_run(ctx.run.id, status, exit_code, error)
        store.add_event(ctx.run.id, "run.finished", status=status, exit_code=exit_code, error=error)
        run = store.get_run(ctx.run.id)
        phases = store.phases(run.id)
        manifest.write(ctx, run, phases)
    ctx.reporter.phase("run", status, error or "")
    if ctx.instance_id is None and any(event.kind == "step.detached" for event in store.events(run.id)):
        ctx.reporter.info(
            f"the step keeps running on its host: `runner logs {run.id} -f` follows it,"
            f" `runner stop {run.id}` stops it"
        )
    if unexpected is not None:
        raise unexpected
    return RunResult(run=run, phases=phases, artifacts=ctx.artifacts)


def _internal(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Treat SIGTERM and SIGHUP (terminal closed) like Ctrl-C, so teardown still runs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let teardown finish: a second Ctrl-C must not leave containers or instances behind."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _teardown_safely(ctx: RunContext) -> RunnerError | None:
    try:
        _run_phase(ctx, "teardown")
    except RunnerError as exc:
        ctx.reporter.warn(f"teardown failed: {exc.message}")
        return exc
    except Exception as exc:  # teardown must report, never abort the bookkeeping that follows
        ctx.reporter.warn(f"teardown failed: {_internal(exc)}")
        return RunFailed(_internal(exc))
    return None


def _run_phase(ctx: RunContext, name: str) -> None:
    step, skip_reason = PHASE_STEPS[name], _skip_reason(ctx, name)
    if skip_reason:
        ctx.store.skip_phase(ctx.run.id, name, skip_reason)
        ctx.reporter.phase(name, "skipped", skip_reason)
        return
    attempt = ctx.store.start_phase(ctx.run.id, name)
    ctx.reporter.phase(name, "started")
    started = time.monotonic()
    try:
        step(ctx)
    except RunnerError as exc:
        ctx.store.end_phase(ctx.run.id, name, attempt, "failed", exc.message)
        ctx.reporter.phase(name, "failed", exc.message)
        raise
    except KeyboardInterrupt:
        ctx.store.end_phase(ctx.run.id, name, attempt, "interrupted")
        raise
    except Exception as exc:
        ctx.store.end_phase(ctx.run.id, name, attempt, "failed", _internal(exc))
        raise
    ctx.store.end_phase(ctx.run.id, name, attempt, "succeeded")
    ctx.reporter.phase(name, "done", f"{time.monotonic() - started:.1f}s")


def _skip_reason(ctx: RunContext, name: str) -> str | None:
    caps = ctx.provider.capabilities
    if name == "provision" and not caps.instances:
        return f"{ctx.provider.type} provider runs on this machine"
    if name == "boot_gpu" and not caps.power_modes:
        return f"{ctx.provider.type} provider has no separate GPU boot"
    if name == "boot_gpu" and ctx.loaded.spec.train.gpus == 0:
        return "the job asks for no GPU (train.gpus: 0): training runs on the set-up boot"
    return None


# -- the phases ------------------------------------------------------------------


def _plan(ctx: RunContext) -> None:
    """Check the secrets, hash the inputs and pin the image before anything is staged or paid for."""
    spec = ctx.loaded.spec
    _secret_values(tuple({name for part in (*spec.setup, spec.train) for name in part.secrets}))
    for item in ctx.loaded.spec.inputs:
        path = ctx.loaded.resolve(item.src)
        digest, size = sha256_file(path)
        if item.sha256 and item.sha256 != digest:
            raise BadInput(f"input {item.src}: sha256 is {digest}, the spec expects {item.sha256}")
        ctx.inputs.append(InputRecord(src=str(path), dest=item.target, sha256=digest, bytes=size))
    build_log = ctx.log_sink("image-build.log", "image", echo=ctx.reporter.verbose)
    if ctx.loaded.spec.image.build is not None:
        ctx.reporter.info(f"building the image (log: {ctx.run_dir / 'logs' / 'image-build.log'})")
    ctx.image = resolve_image(ctx.loaded, build_log)
    ctx.store.add_event(ctx.run.id, "image.resolved", id=ctx.image.image.id, ref=ctx.image.image.ref)
    if ctx.loaded.spec.image.build is not None:
        write_lock(ctx.loaded, ctx.image)
    if ctx.provider.capabilities.instances:
        from runner.layers import prepare_for_transfer

        ctx.reporter.info("reading and compressing the image's layers before any instance is billed")
        prepare_for_transfer(ctx.image.image.id)
    manifest.write(ctx, ctx.run, ctx.store.phases(ctx.run.id))


def _provision(ctx: RunContext) -> None:
    """Get the instance (the spec's, or a new one) and boot it for set-up: without its GPU
    where the provider can, so downloads, conversions and image transfers never run at GPU prices."""
    provider = ctx.provider
    ctx.instance_id, ctx.instance_created = provider.instance_for(ctx.run.id)
    ctx.store.add_event(ctx.run.id, "instance.acquired", id=ctx.instance_id, created=ctx.instance_created)
    mode = PowerMode.CPU if provider.capabilities.power_modes else PowerMode.GPU
    if mode is PowerMode.GPU:
        ctx.reporter.warn(f"{provider.type} instances boot with their GPU only: set-up runs at GPU prices")
    ctx.host = provider.open_host(ctx.run.id, _boot(ctx, mode))


def _boot(ctx: RunContext, mode: PowerMode) -> Instance:
    provider = ctx.provider
    ctx.reporter.info(f"booting {ctx.instance_id} ({mode.value} mode)")
    instance = instances.boot(provider.api, ctx.instance_id, mode, provider.boot_policy, ctx.reporter.info)
    ctx.store.add_event(ctx.run.id, "instance.powered_on", id=ctx.instance_id, mode=mode.value)
    return instance


def _power_off(ctx: RunContext) -> None:
    instances.shut(ctx.provider.api, ctx.instance_id, ctx.provider.boot_policy)
    ctx.store.add_event(ctx.run.id, "instance.powered_off", id=ctx.instance_id)


def _stage(ctx: RunContext) -> None:
    """Ship the image, inputs and job files to the host (opened here unless provision did), then
    run the setup steps."""
    if ctx.host is None:
        ctx.host = ctx.provider.open_host(ctx.run.id)
    ctx.host.ensure_image(ctx.image.image.id)
    ctx.host.put_job_file("job.yaml", ctx.loaded.text.encode("utf-8"))
    resolved = ctx.loaded.spec.model_dump(mode="json")
    ctx.host.put_job_file("spec.json", json.dumps(resolved, indent=2, ensure_ascii=False).encode("utf-8"))
    for item in ctx.inputs:
        placed = ctx.host.put_input(Path(item.src), item.dest)
        if placed != item.sha256:
            raise BadInput(f"input {item.src} changed since it was hashed (sha256 now {placed}); rerun")
    for index, step in enumerate(ctx.loaded.spec.setup, start=1):
        log_name = f"setup-{index:02d}-{step.name}.log"
        request = ContainerRun(
            name=f"setup:{step.name}",
            image_id=ctx.image.image.id,
            script=step.run,
            env={**step.env, **_secret_values(step.secrets)},
        )
        _run_container(ctx, request, log_name)


def _boot_gpu(ctx: RunContext) -> None:
    """Power off after set-up and boot again with the GPU; the run's files stay on the data disk.
    No GPU free: the instance stays off while the boot is retried (infra.instances.boot)."""
    host, ctx.host = ctx.host, None
    host.close(keep_workspace=True)
    _power_off(ctx)
    ctx.host = ctx.provider.open_host(ctx.run.id, _boot(ctx, PowerMode.GPU))
    ctx.host.ensure_image(ctx.image.image.id)  # finds everything in place: nothing is sent


def _train(ctx: RunContext) -> None:
    train = ctx.loaded.spec.train
    request = ContainerRun(
        name="train",
        image_id=ctx.image.image.id,
        script=train.run,
        env={**train.env, **_secret_values(train.secrets)},
        gpus=train.gpus,
    )
    _run_container(ctx, request, "train.log")


def _collect(ctx: RunContext) -> None:
    """Bring the declared outputs home and record each file's sha256."""
    spec = ctx.loaded.spec
    artifacts_dir = ctx.run_dir / "artifacts"
    files = ctx.host.fetch_outputs(spec.outputs, artifacts_dir)
    for file in files:
        ctx.artifacts.append(
            Artifact(path=str(file.path.relative_to(ctx.run_dir)), sha256=file.sha256, bytes=file.bytes)
        )
    _collect_metrics(ctx, artifacts_dir)
    ctx.store.add_event(ctx.run.id, "artifacts.collected", count=len(files))


def _collect_metrics(ctx: RunContext, artifacts_dir: Path) -> None:
    """Copy the trainer's metrics to runs/<id>/metrics.jsonl, declared as an output or not
    (fetched from the host only when collect did not already bring it)."""
    collected = artifacts_dir / posixpath.relpath(ctx.loaded.spec.train.metrics, "/out")
    if collected.is_file():
        shutil.copyfile(collected, ctx.run_dir / "metrics.jsonl")
        return
    scratch = ctx.run_dir / ".metrics"
    try:
        (fetched,) = ctx.host.fetch_outputs((ctx.loaded.spec.train.metrics,), scratch)
        fetched.path.replace(ctx.run_dir / "metrics.jsonl")
    except RunFailed as exc:
        ctx.reporter.warn(f"no metrics collected: {exc.message}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _teardown(ctx: RunContext) -> None:
    """Close the host, then end the instance's billing, whatever happened before."""
    try:
        if ctx.host is not None:
            ctx.host.close(keep_workspace=ctx.failed)
            if ctx.failed:
                ctx.reporter.info("the run's work folder was kept for inspection")
    finally:
        if ctx.instance_id is not None:
            _end_instance(ctx)


def _end_instance(ctx: RunContext) -> None:
    """The spec's shutdown policy: stop (default), release (only an instance made for this run,
    and only after it is off), or keep it running."""
    after = ctx.loaded.spec.shutdown.after
    if after == "keep":
        ctx.reporter.warn(f"instance {ctx.instance_id} is left running (shutdown.after: keep): it is billed")
        return
    _power_off(ctx)
    for event in ctx.store.events(ctx.run.id):  # a step left running went down with the instance
        if event.kind == "step.detached":
            ctx.store.add_event(
                ctx.run.id, "step.stopped", step_dir=event.data["step_dir"], name=event.data["name"]
            )
    if after == "release" and ctx.instance_created:
        ctx.provider.api.release(ctx.instance_id)
        ctx.store.add_event(ctx.run.id, "instance.released", id=ctx.instance_id)


def _secret_values(names: tuple[str, ...]) -> dict[str, str]:
    """Values of the named secrets, read from this process's environment at the moment they are
    needed: the spec names them, nothing records them (not the store, the manifest or /job)."""
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise BadInput(f"secrets not set in the environment: {', '.join(missing)}")
    return {name: os.environ[name] for name in names}


def _run_container(ctx: RunContext, request: ContainerRun, log_name: str) -> None:
    code = ctx.host.run(request, ctx.log_sink(log_name, request.name))
    ctx.store.add_event(ctx.run.id, "container.exited", name=request.name, exit_code=code)
    if code != 0:
        log = ctx.run_dir / "logs" / log_name
        raise RunFailed(f"{request.name} exited with code {code} (log: {log})")


PHASE_STEPS: dict[str, Callable[[RunContext], None]] = {
    "plan": _plan,
    "provision": _provision,
    "stage": _stage,
    "boot_gpu": _boot_gpu,
    "train": _train,
    "collect": _collect,
    "teardown": _teardown,
}


def _new_run_id(job_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{job_name}-{stamp}-{secrets.token_hex(3)}"


def _make_run_dir(out_root: Path, run_id: str) -> Path:
    """A fresh folder for the run; an existing one is never reused or overwritten."""
    out_root.mkdir(parents=True, exist_ok=True)
    run_dir = out_root.resolve() / run_id
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise BadInput(f"run folder {run_dir} already exists; refusing to overwrite it") from None
    for sub in ("artifacts", "logs"):
        (run_dir / sub).mkdir()
    return run_dir


def run_status(ref: str) -> RunResult:
    """A run's record and phases as the store has them."""
    with open_store() as store:
        run = store.get_run(ref)
        return RunResult(run=run, phases=store.phases(run.id), artifacts=manifest.read_artifacts(run))


def list_runs(limit: int) -> list[Run]:
    with open_store() as store:
        return store.list_runs(limit)
