"""The run's phase state machine: the only place that knows the order of phases.

Each phase is recorded in the store before it starts and after it ends, so `runner status`
always tells where a run is and why it stopped. Phases a provider has no use for are
recorded as skipped with the reason. Teardown runs whatever happened before it: nothing
the run started may outlive it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import posixpath
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from infra import instances
from infra.base import ContainerRun, Guard, Host, Instance, InstanceState, PowerMode, Provider
from infra.registry import provider_for
from runner import billing, budget, interrupts, manifest, pricing, provenance, runlock
from runner.console import Reporter
from runner.errors import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    BadInput,
    BudgetExceeded,
    ProviderFailure,
    RunFailed,
    RunnerError,
)
from runner.files import sha256_file, write_json_atomic
from runner.images import ResolvedImage, require_pinned_id, resolve_image, write_lock
from runner.layer_sources import RegistrySource, resolve_source
from runner.manifest import Artifact, InputRecord
from runner.spec import LoadedSpec, load_spec
from runner.store import Phase, Run, Store, open_store

T = TypeVar("T")
PHASES = ("plan", "provision", "stage", "boot_gpu", "train", "collect", "teardown")
MAX_POWER_CUTS = 3  # power-offs from outside (preemption) a phase rides out before the run fails
HOST_LOST = (ProviderFailure, EOFError, OSError)  # a link cut mid-read can surface raw from paramiko
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
    registry: RegistrySource | None = None  # where the host may fetch the image's public layers
    inputs: list[InputRecord] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    failed: bool = False
    pinned: Pinned | None = None  # set on resume: what the run used before, checked by plan
    phase: str | None = None  # the phase running now
    watchdog_stop: dict | None = None  # the watchdog's decision to stop training (its reason)
    boot_clock: tuple[float, float] | None = None  # the open interval's start, steady_now() then
    source: dict | None = None  # the git checkouts of runner and of the job (runner.provenance)
    reproduces: str | None = None  # the run this one runs again (`runner reproduce`)

    def log_sink(
        self, log_name: str, source: str, *, echo: bool = True, fresh: bool = False
    ) -> Callable[[str], None]:
        """A callback that appends a line to logs/<log_name> (emptied first if fresh) and, if
        echo, shows it on the terminal. The logs folder is made if the run folder was deleted
        meanwhile (the phase's end notices the folder's marker missing and says so)."""
        path = self.run_dir / "logs" / log_name
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("w" if fresh else "a", encoding="utf-8")
        self._open_logs.append(handle)

        def sink(line: str) -> None:
            handle.write(line + "\n")
            handle.flush()
            if echo:
                self.reporter.output(source, line)

        return sink

    @property
    def resumed(self) -> bool:
        return self.pinned is not None

    def close_logs(self) -> None:
        for handle in self._open_logs:
            handle.close()
        self._open_logs.clear()

    def __post_init__(self) -> None:
        self._open_logs: list = []


@dataclass(frozen=True)
class Pinned:
    """What a resumed run used so far: plan must find the same image and inputs again."""

    image_id: str | None
    inputs: dict[str, str]  # local path -> sha256


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
    spec_path: str | Path,
    out_root: Path,
    reporter: Reporter,
    *,
    accept_new_host_key: bool = False,
    reproduces: str | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Validate the spec, record a new run and drive it through every phase (reproduces: the
    run this one runs again, for its manifest; run_id: the ID `submit --detach` chose)."""
    loaded = load_spec(spec_path)
    provider = provider_for(loaded.spec.provider, accept_new_host_key=accept_new_host_key)
    require_pinned_id(loaded)
    with open_store() as store:
        run_id = run_id or new_run_id(loaded.spec.name)
        with runlock.hold(run_id):
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
            try:
                store.create_run(run, spec=str(loaded.path), provider=provider.type)
            except BaseException:  # no folder of a run that was never recorded
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            reporter.info(f"run {run_id} -> {run_dir}")
            ctx = RunContext(store, run, loaded, run_dir, provider, reporter, reproduces=reproduces)
            with interrupts.raised_as_keyboard_interrupt():
                return _execute(ctx)


def resume(ref: str, reporter: Reporter, *, accept_new_host_key: bool = False) -> RunResult:
    """Drive a run that stopped before its end (its runner process killed, the laptop asleep,
    a failure worth retrying) on from its first unfinished phase.

    Plan runs again and must find the same image and inputs. Every later phase is idempotent:
    the instance recorded is reused (booted in the mode the phase needs, or used as it runs),
    a step started before is reattached (running or ended) instead of started twice, and
    teardown ends the instance's billing as on any run.
    """
    with open_store() as store, runlock.hold(store.get_run(ref).id):
        run = store.get_run(ref)  # again, under the lock: another process may have finished it
        if run.status == "succeeded":
            raise BadInput(f"run {run.id} already succeeded; nothing to resume")
        loaded = _spec_as_run(run)
        provider = provider_for(loaded.spec.provider, accept_new_host_key=accept_new_host_key)
        run_dir = Path(run.run_dir)
        _make_run_dir_parts(run_dir, run.id)  # (a folder from before markers is adopted)
        done = _finished_phases(store.phases(run.id))
        store.abandon_phases(run.id, "the runner process driving it ended during this phase")
        store.reopen_run(run.id)
        ctx = RunContext(store, run, loaded, run_dir, provider, reporter)
        _restore(ctx, done)
        resume_at = next(name for name in PHASES[1:] if name not in done)
        store.add_event(run.id, "run.resumed", at=resume_at, previous_status=run.status)
        reporter.info(f"resuming run {run.id} at {resume_at} -> {run_dir}")
        with interrupts.raised_as_keyboard_interrupt():
            return _execute(ctx, done)


def _spec_as_run(run: Run) -> LoadedSpec:
    """The run's job spec, refused if it changed since the run began."""
    loaded = load_spec(run.spec_path)
    if loaded.sha256 != run.spec_sha256:
        raise BadInput(
            f"{run.spec_path} changed since run {run.id} began (sha256 {loaded.sha256[:12]},"
            f" was {run.spec_sha256[:12]}); restore it to resume, or submit it as a new run"
        )
    return loaded


def _finished_phases(phases: list[Phase]) -> frozenset[str]:
    """Phases whose last attempt succeeded or was skipped. Plan is never among them (its
    results, hashes and the pinned image, live in memory and are cheap to establish again), nor
    teardown (it runs at the end of every session)."""
    last = {phase.name: phase.status for phase in phases}  # ordered by start: the last attempt wins
    return frozenset(
        name
        for name, status in last.items()
        if status in ("succeeded", "skipped") and name not in ("plan", "teardown")
    )


def _restore(ctx: RunContext, done: frozenset[str]) -> None:
    """What a resumed run knew before: its instance, its image and inputs, its artifacts."""
    image_id = None
    for event in ctx.store.events(ctx.run.id):
        if event.kind == "instance.acquired":
            ctx.instance_id, ctx.instance_created = event.data["id"], bool(event.data["created"])
        elif event.kind == "image.resolved":
            image_id = event.data["id"]
    recorded = manifest.read(ctx.run, ctx.store)
    inputs = {item["src"]: item["sha256"] for item in recorded.get("inputs", [])}
    ctx.pinned = Pinned(image_id, inputs)
    if "collect" in done:
        ctx.artifacts = manifest.read_artifacts(ctx.run)
    watchdog_log = ctx.run_dir / "logs" / "watchdog.log"
    if "train" in done and watchdog_log.is_file():  # a stop made then still fails the run
        ctx.watchdog_stop = budget.watchdog_stop(watchdog_log.read_text(encoding="utf-8"))


def _execute(ctx: RunContext, done: frozenset[str] = frozenset()) -> RunResult:
    status, exit_code, error, unexpected = "succeeded", EXIT_OK, None, None
    try:
        _run_phases(ctx, done)
    except RunnerError as exc:
        status, exit_code, error = "failed", exc.exit_code, exc.message
    except KeyboardInterrupt as exc:
        status, exit_code, error = "interrupted", EXIT_INTERRUPTED, f"interrupted ({exc or 'SIGINT'})"
    except Exception as exc:  # a bug or an unforeseen library error: record it, then let the CLI report it
        status, exit_code, error, unexpected = "failed", EXIT_RUN_FAILED, _internal(exc), exc
    with interrupts.ignored():
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
        _keep_run_dir(ctx)
        manifest.write(ctx, run, phases)
        if ctx.instance_id is not None:
            report = billing.run_report(store, run.id)
            write_json_atomic(ctx.run_dir / "cost.json", report)
            for line in billing.summary_lines(report):
                ctx.reporter.info(line)
        _chart(ctx, run)
    ctx.reporter.close()
    ctx.reporter.phase("run", status, error or "")
    if ctx.instance_id is None and any(event.kind == "step.detached" for event in store.events(run.id)):
        ctx.reporter.info(
            f"the step keeps running on its host: `runner logs {run.id} -f` follows it,"
            f" `runner stop {run.id}` stops it"
        )
    if unexpected is not None:
        raise unexpected
    return RunResult(run=run, phases=phases, artifacts=ctx.artifacts)


def _run_phases(ctx: RunContext, done: frozenset[str]) -> None:
    """Every phase but teardown (and but those done before a resume), in order."""
    for name in PHASES[:-1]:
        if name not in done:
            _run_phase(ctx, name)
    stop = ctx.watchdog_stop
    if stop is not None:  # training was cut short: the run fails, with what it wrote brought home
        text = f"the watchdog stopped training: {stop.get('reason')}; what it wrote until then was collected"
        raise BudgetExceeded(text) if stop.get("budget") else RunFailed(text)


def _chart(ctx: RunContext, run: Run) -> None:
    """runs/<id>/loss.png and loss.csv, when the run wrote losses; a chart that cannot be drawn
    is worth a warning, never a failed run."""
    from runner import plot

    try:
        chart = plot.chart_run(ctx.run_dir, manifest.read(run, ctx.store))
    except (OSError, ValueError, ImportError) as exc:
        ctx.reporter.warn(f"no loss chart: {type(exc).__name__}: {exc}")
        return
    if chart is not None:
        ctx.reporter.info(f"loss chart: {chart}")


def _internal(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


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
    ctx.phase = name
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
    _keep_run_dir(ctx)
    manifest.write(ctx, ctx.run, ctx.store.phases(ctx.run.id))  # what the phase learned, kept for a resume
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
    ctx.source = {
        "runner": provenance.checkout_of(Path(__file__)),
        "job": provenance.checkout_of(ctx.loaded.path),
    }
    estimate = budget.check_estimate(spec, pricing.for_job(spec))
    if estimate is not None:
        ctx.reporter.info(f"budget: {estimate}")
        ctx.store.add_event(ctx.run.id, "budget.estimate", text=estimate)
    for item in ctx.loaded.spec.inputs:
        path = ctx.loaded.resolve(item.src)
        digest, size = sha256_file(path)
        if item.sha256 and item.sha256 != digest:
            raise BadInput(f"input {item.src}: sha256 is {digest}, the spec expects {item.sha256}")
        was = ctx.pinned.inputs.get(str(path)) if ctx.pinned else None
        if was is not None and was != digest:
            raise BadInput(f"input {path} changed since the run began (sha256 {digest[:12]}, was {was[:12]})")
        ctx.inputs.append(InputRecord(src=str(path), dest=item.target, sha256=digest, bytes=size))
    build_log = ctx.log_sink("image-build.log", "image", echo=ctx.reporter.verbose)
    if ctx.loaded.spec.image.build is not None:
        ctx.reporter.info(f"building the image (log: {ctx.run_dir / 'logs' / 'image-build.log'})")
    ctx.image = resolve_image(ctx.loaded, build_log)
    if ctx.pinned and ctx.pinned.image_id and ctx.pinned.image_id != ctx.image.image.id:
        raise BadInput(
            f"the job's image is now {ctx.image.image.id[:19]}, the run began with"
            f" {ctx.pinned.image_id[:19]}; restore the image to resume, or submit a new run"
        )
    ctx.store.add_event(ctx.run.id, "image.resolved", id=ctx.image.image.id, ref=ctx.image.image.ref)
    if ctx.provider.capabilities.ships_image:
        ctx.registry = _resolve_registry(ctx)
    if ctx.loaded.spec.image.build is not None:
        write_lock(ctx.loaded, ctx.image, ctx.registry)
    if ctx.provider.capabilities.instances:
        from runner.layers import prepare_for_transfer

        ctx.reporter.info("reading and compressing the image's layers before any instance is billed")
        prepare_for_transfer(
            ctx.image.image.id, skip=frozenset(ctx.registry.blobs) if ctx.registry else frozenset()
        )


def _resolve_registry(ctx: RunContext) -> RegistrySource | None:
    """The base image as its registry serves it, so the host fetches those layers itself."""
    found = resolve_source(ctx.loaded.spec.image, ctx.image.base, ctx.provider.type, ctx.reporter.info)
    if found is not None:
        served = sum(1 for diff_id in dict.fromkeys(ctx.image.image.layers) if diff_id in found.blobs)
        ctx.reporter.info(
            f"base image {found.ref} ({found.manifest_digest[:19]}, at {found.resolved_at}):"
            f" {served} of {len(set(ctx.image.image.layers))} layers can come from a registry"
        )
        ctx.store.add_event(ctx.run.id, "image.registry", **found.to_lock(), layers_served=served)
    return found


def _provision(ctx: RunContext) -> None:
    """Get the instance (the spec's, the one this run acquired before a resume, or a new one)
    and boot it for set-up: without its GPU where the provider can, so downloads, conversions
    and image transfers never run at GPU prices."""
    provider = ctx.provider
    if ctx.instance_id is None:
        _note_balance(ctx, "before")
        ctx.instance_id, ctx.instance_created = provider.instance_for(ctx.run.id)
        ctx.store.add_event(ctx.run.id, "instance.acquired", id=ctx.instance_id, created=ctx.instance_created)
    if _setup_mode(ctx) is PowerMode.GPU:
        ctx.reporter.warn(f"{provider.type} instances boot with their GPU only: set-up runs at GPU prices")
    ctx.host = provider.open_host(ctx.run.id, _boot(ctx, _setup_mode(ctx)))


def _setup_mode(ctx: RunContext) -> PowerMode:
    return PowerMode.CPU if ctx.provider.capabilities.power_modes else PowerMode.GPU


def _train_mode(ctx: RunContext) -> PowerMode:
    return _setup_mode(ctx) if _skip_reason(ctx, "boot_gpu") else PowerMode.GPU


def _open_host(ctx: RunContext, mode: PowerMode | None, *, with_image: bool) -> Host:
    """The run's host: the one open, or (in a resumed run) opened again, its instance booted
    in mode first (None: as it runs now, or for set-up if it is off); with_image, the image is
    made ready for steps (finding it in place costs a listing, nothing is sent)."""
    if ctx.host is not None:
        return ctx.host
    instance = None
    if ctx.instance_id is not None:
        instance = _boot(ctx, mode or _running_mode(ctx) or _setup_mode(ctx))
    ctx.host = ctx.provider.open_host(ctx.run.id, instance)
    if with_image:
        _ensure_image(ctx)
    return ctx.host


def _boot(ctx: RunContext, mode: PowerMode) -> Instance:
    provider = ctx.provider
    if _train_mode(ctx) is PowerMode.GPU:
        _check_gpu_price(ctx)
    _close_if_gone_off(ctx)
    ctx.reporter.info(f"booting {ctx.instance_id} ({mode.value} mode)")
    requested, steady = time.time(), billing.steady_now()
    instance = instances.boot(provider.api, ctx.instance_id, mode, provider.boot_policy, ctx.reporter.info)
    ctx.store.add_event(ctx.run.id, "instance.powered_on", id=ctx.instance_id, mode=mode.value)
    opened = billing.open_for_boot(
        ctx.store, ctx.loaded.spec, ctx.run.id, ctx.phase, instance, mode, requested
    )
    if opened is not None:
        ctx.boot_clock = (opened, steady)
    return instance


def _close_if_gone_off(ctx: RunContext) -> None:
    """An instance that went off by itself (its watchdog, or from outside) still has its
    interval open: closed here with what the provider and this process's steady clock say."""
    if ctx.store.open_interval_of(ctx.instance_id) is None:
        return
    now = ctx.provider.api.describe(ctx.instance_id)
    if now.state is InstanceState.STOPPED:
        opened, ctx.boot_clock = ctx.boot_clock, None
        billing.close_at_stop(ctx.store, now, time.time(), opened)


def _check_gpu_price(ctx: RunContext) -> None:
    """Refuse to boot an instance whose provider now prices its GPU over budget.max_hourly_price
    (checked before every boot: a set-up boot is wasted money if training cannot follow)."""
    instance = ctx.provider.api.describe(ctx.instance_id)
    price = instance.price_per_hour.get(PowerMode.GPU)
    if price:
        job_currency = pricing.for_job(ctx.loaded.spec).currency
        where = f"{ctx.provider.type} instance {ctx.instance_id}"
        budget.check_hourly_price(ctx.loaded.spec, job_currency, price, instance.currency, where)


def _power_off(ctx: RunContext) -> None:
    stopped = instances.shut(ctx.provider.api, ctx.instance_id, ctx.provider.boot_policy)
    ctx.store.add_event(ctx.run.id, "instance.powered_off", id=ctx.instance_id)
    opened, ctx.boot_clock = ctx.boot_clock, None
    billing.close_at_stop(ctx.store, stopped, time.time(), opened)


def _note_balance(ctx: RunContext, when: str) -> None:
    """Record the account's balance (where the provider has one) before and after the run."""
    with contextlib.suppress(RunnerError):
        value = ctx.provider.api.balance()
        if value is not None:
            ctx.store.add_event(ctx.run.id, f"balance.{when}", value=value)


def _ensure_image(ctx: RunContext) -> None:
    ctx.host.ensure_image(ctx.image.image.id, ctx.reporter.progress, ctx.registry, ctx.reporter.info)


def _stage(ctx: RunContext) -> None:
    """Ship the image, inputs and job files to the host (opened here unless provision did), then
    run the setup steps."""
    _open_host(ctx, _setup_mode(ctx), with_image=False)
    _surviving_power_off(ctx, lambda: _stage_on_host(ctx))


def _stage_on_host(ctx: RunContext) -> None:
    """Stage's work on the open host; done again after a power-off from outside, it finds what
    is in place (the image, inputs with their sha256, steps that ended) and does the rest."""
    _ensure_image(ctx)
    ctx.host.put_job_file("job.yaml", ctx.loaded.text.encode("utf-8"))
    resolved = ctx.loaded.spec.model_dump(mode="json")
    ctx.host.put_job_file("spec.json", json.dumps(resolved, indent=2, ensure_ascii=False).encode("utf-8"))
    for item in ctx.inputs:
        placed = ctx.host.put_input(Path(item.src), item.dest, ctx.reporter.progress)
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
    if ctx.host is not None:  # not after a resume: infra.instances.boot stops what runs
        _drop_host(ctx)
        _power_off(ctx)
    _open_host(ctx, PowerMode.GPU, with_image=True)  # finds the image in place: nothing is sent


def _train(ctx: RunContext) -> None:
    """Run the trainer with its watchdog next to it. The watchdog powers a rented instance off as
    soon as the trainer ends, which may cut this session before it saw the end: then the
    instance is booted without its GPU and the step's recorded end is read there. An instance
    powered off before the trainer ended (preempted, or stopped from outside) is booted with
    its GPU again, and the trainer starts again from its last checkpoint in /out."""
    spec = ctx.loaded.spec
    train, watchdog = spec.train, spec.watchdog
    request = ContainerRun(
        name="train",
        image_id=ctx.image.image.id,
        script=train.run,
        env={**train.env, **_secret_values(train.secrets)},
        gpus=train.gpus,
        guard=Guard(
            train.metrics,
            watchdog.stall_s,
            watchdog.heartbeat_s,
            watchdog.grace_s,
            watchdog.interval_s,
            max_run_s=_budget_left_s(ctx),
        ),
    )
    ctx.reporter.progress.cost_so_far = lambda: billing.so_far(ctx.store, ctx.run.id)
    if _off_after_training(ctx):
        ctx.reporter.info("the instance is off: looking for the trainer's end on a boot without the GPU")
        if _ended_while_off(ctx):
            return _follow_trainer(ctx, request)
    for cut in itertools.count():
        _open_host(ctx, _train_mode(ctx), with_image=True)
        try:
            return _follow_trainer(ctx, request)
        except HOST_LOST:
            if ctx.instance_id is None or not _going_off(ctx):
                raise
        ctx.reporter.info(
            f"instance {ctx.instance_id} went off; looking for the trainer's end without the GPU"
        )
        if _ended_while_off(ctx):  # its watchdog powered it off as the trainer ended
            return _follow_trainer(ctx, request)
        _count_power_cut(ctx, "training", cut)


def _follow_trainer(ctx: RunContext, request: ContainerRun) -> None:
    """Start or reattach to the trainer and follow it to its end; a failure is the run's unless
    the watchdog stopped training (then what it wrote is collected first)."""
    try:
        _run_container(ctx, request, "train.log")
    except RunFailed:
        if _watchdog_stop(ctx, after_failure=True) is None:
            raise
    else:
        _watchdog_stop(ctx)


def _ended_while_off(ctx: RunContext) -> bool:
    """Boot the instance without its GPU and tell whether the trainer had ended (with an exit
    code) before it went off; if not, the instance is left off, ready for a GPU boot."""
    _drop_host(ctx)
    if _open_host(ctx, _setup_mode(ctx), with_image=True).step_ended("train"):
        return True
    _drop_host(ctx)
    _power_off(ctx)
    return False


def _count_power_cut(ctx: RunContext, doing: str, cut: int) -> None:
    """Record a power-off from outside that cut doing; after MAX_POWER_CUTS of them, give up
    (the instance is off; `runner resume` tries again)."""
    ctx.store.add_event(ctx.run.id, "instance.cut", id=ctx.instance_id, doing=doing)
    if cut >= MAX_POWER_CUTS:
        raise ProviderFailure(
            f"instance {ctx.instance_id} was powered off from outside {cut + 1} times during {doing};"
            f" `runner resume {ctx.run.id}` tries again"
        )
    ctx.reporter.warn(
        f"instance {ctx.instance_id} was powered off from outside (preempted?) during {doing}:"
        " booting it again; what was done is kept"
    )


def _budget_left_s(ctx: RunContext) -> float | None:
    """GPU seconds the budget's caps leave for training (None without caps)."""
    billed = ctx.store.open_interval_of(ctx.instance_id) if ctx.instance_id else None
    rates = pricing.for_job(ctx.loaded.spec)
    rate, currency = (
        (billed.rate_per_hour, billed.currency) if billed else (rates.gpu_per_hour, rates.currency)
    )
    left = budget.seconds_left(ctx.loaded.spec, ctx.store.ledger(ctx.run.id), rate, currency, time.time())
    if left is not None and left <= 0:
        raise BudgetExceeded("the budget is spent before training starts (see `runner cost RUN`)")
    return left


def _watchdog_stop(ctx: RunContext, after_failure: bool = False) -> dict | None:
    """The watchdog's decision to stop the trainer, if it made one (its log, brought home, says);
    kept in ctx.watchdog_stop: the run collects what was written, then fails (exit code 4 at a
    budget cap).

    After the trainer failed, the log must be read before anything is concluded: the watchdog
    powers the instance off right after its stop, which can cut the read, and an unread stop
    would leave a stalled run looking like a failed trainer, with nothing collected. Then the
    instance is taken for lost (`_train` boots it without the GPU and follows again)."""
    log = ctx.run_dir / "logs" / "watchdog.log"
    fresh = _fetch_watchdog_log(ctx)
    if after_failure and not fresh and ctx.instance_id is not None and _going_off(ctx):
        raise ProviderFailure(f"instance {ctx.instance_id} went off before the watchdog's log was read")
    stop = budget.watchdog_stop(log.read_text(encoding="utf-8")) if log.is_file() else None
    if stop is not None:
        ctx.reporter.warn(f"the watchdog stopped training: {stop.get('reason')}")
    ctx.watchdog_stop = stop
    return stop


def _fetch_watchdog_log(ctx: RunContext) -> bool:
    """Bring the watchdog's log home (to settle billing with its power-off time), into
    logs/watchdog.log; whether a fresh copy came (the watchdog may be powering off)."""
    try:
        return ctx.host.fetch_host_log("watchdog.log", ctx.run_dir / "logs" / "watchdog.log")
    except HOST_LOST:
        return False


def _off_after_training(ctx: RunContext) -> bool:
    """Whether a resumed run finds its instance off where training needs the GPU: the trainer
    may have ended and its watchdog powered off, which a boot without the GPU can tell."""
    return (
        ctx.host is None
        and ctx.instance_id is not None
        and _train_mode(ctx) is not _setup_mode(ctx)
        and _instance_state(ctx) is not InstanceState.RUNNING
    )


def _surviving_power_off(ctx: RunContext, action: Callable[[], T]) -> T:
    """action() on the run's host, which runs without the GPU; if the host was lost because the
    instance went off meanwhile (powered off from outside, or by a watchdog still at work),
    boot it without the GPU again and do action() again there, up to MAX_POWER_CUTS times."""
    for cut in itertools.count():
        try:
            return action()
        except HOST_LOST:
            if ctx.instance_id is None or not _going_off(ctx):
                raise
        _count_power_cut(ctx, ctx.phase or "the run", cut)
        _drop_host(ctx)
        _open_host(ctx, _setup_mode(ctx), with_image=False)  # stage's action ensures the image itself


def _going_off(ctx: RunContext, within_s: float = 30.0) -> bool:
    """Whether the instance stops (or stopped) within within_s: a host lost for that reason."""
    deadline = time.monotonic() + within_s
    while _instance_state(ctx) is InstanceState.RUNNING:
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def _drop_host(ctx: RunContext) -> None:
    """Let go of the host without removing the run's files; one already gone is fine."""
    host, ctx.host = ctx.host, None
    if host is not None:
        with contextlib.suppress(*HOST_LOST):
            host.close(keep_workspace=True)


def _collect(ctx: RunContext) -> None:
    """Bring the declared outputs home and record each file's sha256. A rented instance is
    collected from on a boot without its GPU: its watchdog powers it off as training ends."""
    spec = ctx.loaded.spec
    artifacts_dir = ctx.run_dir / "artifacts"
    if ctx.instance_id is not None and _running_mode(ctx) is not _setup_mode(ctx):
        _drop_host(ctx)
        _power_off(ctx)
    _open_host(ctx, _setup_mode(ctx), with_image=False)
    files = _surviving_power_off(
        ctx, lambda: ctx.host.fetch_outputs(spec.outputs, artifacts_dir, ctx.reporter.progress)
    )
    for file in files:
        ctx.artifacts.append(
            Artifact(path=str(file.path.relative_to(ctx.run_dir)), sha256=file.sha256, bytes=file.bytes)
        )
    _collect_run_files(ctx, artifacts_dir)
    _fetch_watchdog_log(ctx)  # again: its last decision (the power-off) may postdate train's copy
    ctx.store.add_event(ctx.run.id, "artifacts.collected", count=len(files))


def _collect_run_files(ctx: RunContext, artifacts_dir: Path) -> None:
    """Copy the trainer's metrics, and the configuration and environment it writes next to them
    (trainer/finetune.py) and the record of what was downloaded (trainer.fetch --record), to
    the run folder, declared as outputs or not (fetched from the host only when collect did not
    already bring them). Only missing metrics are worth a warning: a job that runs no finetune
    writes no configuration."""
    metrics = ctx.loaded.spec.train.metrics
    wanted = [(metrics, "metrics.jsonl")]
    beside = [*manifest.TRAINER_FILES.values(), manifest.DOWNLOADS]
    wanted += [(posixpath.join(posixpath.dirname(metrics), name), name) for name in beside]
    scratch = ctx.run_dir / ".collect"
    for remote, name in wanted:
        collected = artifacts_dir / posixpath.relpath(remote, "/out")
        try:
            if collected.is_file():
                shutil.copyfile(collected, ctx.run_dir / name)
                continue
            (fetched,) = ctx.host.fetch_outputs((remote,), scratch)
            fetched.path.replace(ctx.run_dir / name)
        except RunFailed as exc:
            if name == "metrics.jsonl":
                ctx.reporter.warn(f"no metrics collected: {exc.message}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _teardown(ctx: RunContext) -> None:
    """Close the host (reopened after a resume if that needs no boot, to clean it up), then
    end the instance's billing, whatever happened before."""
    try:
        if ctx.host is None and ctx.resumed and _reachable_without_boot(ctx):
            _open_host(ctx, None, with_image=False)
        if ctx.host is not None:
            _collect_again_if_lost(ctx)
            _close_at_teardown(ctx)
            if ctx.failed:
                ctx.reporter.info("the run's work folder was kept for inspection")
    finally:
        if ctx.instance_id is not None:
            _end_instance(ctx)
            watchdog_log = ctx.run_dir / "logs" / "watchdog.log"
            if watchdog_log.is_file():
                text = watchdog_log.read_text(encoding="utf-8", errors="replace")
                billing.settle_with_watchdog(ctx.store, ctx.run.id, ctx.instance_id, text)
            _note_balance(ctx, "after")


def _collect_again_if_lost(ctx: RunContext) -> None:
    """The host's copy of the outputs may go at teardown: if collected files are gone from home
    (the run folder deleted since collect), collect again first."""
    lost = [a.path for a in ctx.artifacts if not (ctx.run_dir / a.path).is_file()]
    if not lost:
        return
    ctx.reporter.warn(
        f"collected files are gone from the run folder ({', '.join(lost)}): collecting them again"
    )
    ctx.artifacts.clear()
    _collect(ctx)


def _close_at_teardown(ctx: RunContext) -> None:
    """Close the host, removing the run's folder unless the run failed. An instance whose
    watchdog powered it off (a failed trainer) has gone with its connection: nothing to close."""
    host, ctx.host = ctx.host, None
    try:
        with contextlib.suppress(ProviderFailure):  # the watchdog's decisions, kept with the run
            host.fetch_host_log("watchdog.log", ctx.run_dir / "logs" / "watchdog.log")
        host.close(keep_workspace=ctx.failed)
    except ProviderFailure:
        if ctx.instance_id is None or not _going_off(ctx):
            raise


def _reachable_without_boot(ctx: RunContext) -> bool:
    if ctx.instance_id is None:
        return not ctx.provider.capabilities.instances
    return _instance_state(ctx) is InstanceState.RUNNING


def _running_mode(ctx: RunContext) -> PowerMode | None:
    """The mode the instance runs (or boots) in now; None when it is off or stopping."""
    now = ctx.provider.api.describe(ctx.instance_id)
    return now.mode if now.state in (InstanceState.RUNNING, InstanceState.STARTING) else None


def _instance_state(ctx: RunContext) -> InstanceState:
    return ctx.provider.api.describe(ctx.instance_id).state


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
        instances.release(ctx.provider.api, ctx.instance_id)
        ctx.store.add_event(ctx.run.id, "instance.released", id=ctx.instance_id)


def _secret_values(names: tuple[str, ...]) -> dict[str, str]:
    """Values of the named secrets, read from this process's environment at the moment they are
    needed: the spec names them, nothing records them (not the store, the manifest or /job)."""
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise BadInput(f"secrets not set in the environment: {', '.join(missing)}")
    return {name: os.environ[name] for name in names}


def _run_container(ctx: RunContext, request: ContainerRun, log_name: str) -> None:
    # fresh: a step reattached after a resume shows its whole log again
    code = ctx.host.run(request, ctx.log_sink(log_name, request.name, fresh=True))
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


def new_run_id(job_name: str) -> str:
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
    _make_run_dir_parts(run_dir, run_id)
    return run_dir


RUN_MARKER = ".runner-run"  # the run's ID; its absence tells a deleted (or replaced) folder


def _make_run_dir_parts(run_dir: Path, run_id: str) -> None:
    for sub in ("artifacts", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).write_text(run_id + "\n", encoding="utf-8")


def _keep_run_dir(ctx: RunContext) -> None:
    """Make the run's folder again if it was deleted while the run went on (its record, manifest
    included, lives in the store; the artifacts are still on the host until teardown). Its
    marker tells, even where a log written meanwhile has made part of the folder again."""
    if (ctx.run_dir / RUN_MARKER).is_file():
        return
    _make_run_dir_parts(ctx.run_dir, ctx.run.id)
    ctx.store.add_event(ctx.run.id, "run_dir.recreated", path=str(ctx.run_dir))
    ctx.reporter.warn(
        f"the run folder {ctx.run_dir} was deleted while the run went on: made it again"
        " (the logs written before are gone; the manifest and artifacts are written into it)"
    )


def run_status(ref: str) -> RunResult:
    """A run's record and phases as the store has them."""
    with open_store() as store:
        run = store.get_run(ref)
        return RunResult(run=run, phases=store.phases(run.id), artifacts=manifest.read_artifacts(run))


def list_runs(limit: int) -> list[Run]:
    with open_store() as store:
        return store.list_runs(limit)
