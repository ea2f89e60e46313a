"""The `runner` command line: parse, call one function, format. No logic lives here.

Heavy modules are imported inside the commands so `runner --help` stays fast. `--json`
prints exactly one JSON document on stdout; everything for humans goes to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import click

from runner import __version__


def _emit_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False, default=str))


def _errors_handled(command):
    """Turn known errors into one-line messages and exit codes; unknown ones into a bug report."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from runner.errors import RunnerError

        as_json = kwargs.get("as_json", False)
        try:
            return command(*args, **kwargs)
        except RunnerError as exc:
            if as_json:
                _emit_json({"error": exc.message, "details": exc.details, "exit_code": exc.exit_code})
            click.echo(f"error: {exc.message}", err=True)
            for line in exc.details:
                click.echo(f"  {line}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            traceback.print_exc()
            message = f"unexpected failure ({type(exc).__name__}); this is a bug in runner, please report it"
            if as_json:
                _emit_json({"error": message, "details": [], "exit_code": 1})
            click.echo(f"error: {message}", err=True)
            sys.exit(1)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
out_option = click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder that receives runs/<run-id>/ (default: the user config's defaults.out, else ./runs).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="runner")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run an ML fine-tuning job on a rented GPU (or this machine) and bring the results back."""
    if ctx.invoked_subcommand and ctx.invoked_subcommand not in QUIET_COMMANDS and not ctx.resilient_parsing:
        _warn_about_orphans()


# Commands that never look for forgotten instances: offline ones, and `down`, which does itself.
QUIET_COMMANDS = ("validate", "emulator", "down")


def _warn_about_orphans() -> None:
    """Every command says loudly when an instance bills with no runner process behind it."""
    import sqlite3

    from runner import orphans
    from runner.errors import RunnerError
    from runner.store import open_store

    try:
        with open_store() as store:
            found = orphans.find(store)
    except (RunnerError, OSError, sqlite3.Error):
        return  # the state folder is unusable: the command itself will say why
    for orphan in found:
        click.secho(f"warning: {orphan.warning()}", err=True, fg="red", bold=True)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@json_option
@_errors_handled
def validate(job: Path, as_json: bool) -> None:
    """Check a job spec without running anything (exit 2 when it is invalid).

    Example: runner validate jobs/smoke.yaml
    """
    from runner.spec import load_spec

    loaded = load_spec(job)
    if as_json:
        _emit_json({"valid": True, "name": loaded.spec.name, "spec_sha256": loaded.sha256})
    else:
        click.echo(f"{job}: valid job spec '{loaded.spec.name}'", err=True)


def _driving_options(command):
    """The options of the commands that drive a run (submit, resume)."""
    for option in reversed(
        (
            click.option("-q", "--quiet", is_flag=True, help="Only print phase failures and the result."),
            click.option("-v", "--verbose", is_flag=True, help="Also show the image build's output."),
            click.option(
                "--accept-new-host-key",
                is_flag=True,
                help="The SSH host was recreated: accept its new host key this once and pin it.",
            ),
            json_option,
        )
    ):
        command = option(command)
    return command


def _report_run(result, as_json: bool) -> None:
    if as_json:
        _emit_json(result.to_dict())
    else:
        _print_result(result)
    sys.exit(result.exit_code)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@out_option
@click.option("--detach", is_flag=True, help="Return at once; a background runner process drives the run.")
@click.option("--run-id", hidden=True, help="The run's ID, chosen by a detaching submit.")
@_driving_options
@_errors_handled
def submit(
    job: Path,
    out_dir: Path,
    detach: bool,
    run_id: str | None,
    quiet: bool,
    verbose: bool,
    accept_new_host_key: bool,
    as_json: bool,
) -> None:
    """Run JOB end to end: plan, stage, train, collect, tear down.

    Example: runner submit jobs/smoke.yaml --detach && runner logs smoke-2026 -f
    """
    from runner.config import runs_folder
    from runner.console import Reporter
    from runner.pipeline import new_run_id
    from runner.pipeline import submit as submit_job

    if detach:
        from runner import detach as background

        started = background.start(
            job, runs_folder(out_dir), accept_new_host_key=accept_new_host_key, run_id_for=new_run_id
        )
        if as_json:
            _emit_json(started)
        else:
            run = started["run_id"]
            click.echo(
                f"run {run} goes on in the background (pid {started['pid']}, log {started['log']}):"
                f" `runner logs {run} -f` follows it, `runner status {run}` shows it",
                err=True,
            )
        return
    reporter = Reporter(quiet=quiet, verbose=verbose)
    result = submit_job(
        job, runs_folder(out_dir), reporter, accept_new_host_key=accept_new_host_key, run_id=run_id
    )
    _report_run(result, as_json)


@main.command()
@click.argument("run_ref", metavar="RUN")
@_driving_options
@_errors_handled
def resume(run_ref: str, quiet: bool, verbose: bool, accept_new_host_key: bool, as_json: bool) -> None:
    """Continue RUN from its first unfinished phase, after its runner process was killed or
    the run failed or was interrupted.

    The instance it used is reused, a step it started is reattached (never started twice),
    and teardown ends the instance's billing as usual.

    Example: runner resume smoke-20261201-101500-a1b2c3
    """
    from runner.console import Reporter
    from runner.pipeline import resume as resume_run

    reporter = Reporter(quiet=quiet, verbose=verbose)
    _report_run(resume_run(run_ref, reporter, accept_new_host_key=accept_new_host_key), as_json)


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--provider",
    metavar="TYPE|FILE",
    help="Run it elsewhere: local, emulator, or a YAML file holding a provider mapping.",
)
@click.option(
    "--loss-tolerance",
    type=click.FloatRange(0),
    default=0.01,
    show_default=True,
    help="Largest difference in loss at a step that still counts as reproduced (GPUs are not bitwise).",
)
@out_option
@_driving_options
@_errors_handled
def reproduce(
    run_ref: str,
    provider: str | None,
    loss_tolerance: float,
    out_dir: Path,
    quiet: bool,
    verbose: bool,
    accept_new_host_key: bool,
    as_json: bool,
) -> None:
    """Run RUN again from its manifest (same image, inputs, commands and seeds), then compare
    its artifacts byte for byte and its loss curve step by step.

    Example: runner reproduce smoke-20261201-120000-ab12cd --provider emulator
    """
    from runner.config import runs_folder
    from runner.console import Reporter
    from runner.reproduce import reproduce as reproduce_run
    from runner.reproduce import summary

    reporter = Reporter(quiet=quiet, verbose=verbose)
    result, report = reproduce_run(
        run_ref,
        runs_folder(out_dir),
        reporter,
        provider=provider,
        loss_tolerance=loss_tolerance,
        accept_new_host_key=accept_new_host_key,
    )
    if as_json:
        _emit_json({**result.to_dict(), "reproduction": report})
    else:
        _print_result(result)
        for line in summary(report) if report else ():
            click.echo(line)
    sys.exit(result.exit_code)


@main.command()
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The PNG to write (default: the run's loss.png, or ./loss-comparison.png for several).",
)
@_errors_handled
def plot(run_refs: tuple[str, ...], output: Path | None) -> None:
    """Draw the loss curves of one run, or of several on one chart (with a CSV of one run's).

    Example: runner plot smoke-20261201-120000-ab12cd smoke-20261202-090000-ef34ab
    """
    from runner import manifest
    from runner import plot as charts
    from runner.errors import NotFound
    from runner.store import open_store

    with open_store() as store:
        runs = [store.get_run(ref) for ref in run_refs]
        recorded = [manifest.read(run, store) for run in runs]
    curves = [charts.read_curves(Path(run.run_dir) / "metrics.jsonl", run.id) for run in runs]
    for run, found in zip(runs, curves, strict=True):
        if found.empty:
            raise NotFound(f"run {run.id} has no losses in {Path(run.run_dir) / 'metrics.jsonl'}")
    if len(runs) == 1 and output is None:
        path = charts.chart_run(Path(runs[0].run_dir), recorded[0])
    else:
        path = output or Path("loss-comparison.png")
        title = charts.run_title(recorded[0], None) if len(runs) == 1 else f"{len(runs)} runs"
        charts.draw(curves, title, path)
    click.echo(str(path))


@main.command()
@click.argument("job", required=False, type=click.Path(path_type=Path))
@json_option
@_errors_handled
def doctor(job: Path | None, as_json: bool) -> None:
    """Check this machine (Docker engine, state folder, config, disk) and, given JOB, the job
    (spec, inputs, secrets, image, SSH key, provider credentials); say what to fix. Exit 2 when
    a check failed. Credentials are reported as set or not, never shown.

    Example: runner doctor jobs/llama7b-lora-zh.yaml
    """
    from runner.doctor import run_checks

    checks = run_checks(job, Path("runs"))
    failed = [check for check in checks if check.status == "fail"]
    if as_json:
        _emit_json({"ok": not failed, "checks": [check.to_dict() for check in checks]})
    else:
        for check in checks:
            click.echo(check.line())
        click.echo(f"{len(failed)} problem(s) to fix" if failed else "all checks passed", err=True)
    sys.exit(2 if failed else 0)


@main.command()
@click.argument("run_ref", metavar="RUN")
@json_option
@_errors_handled
def compare(run_ref: str, as_json: bool) -> None:
    """Answers to fixed prompts before and after fine-tuning, side by side (the run's
    samples.json, written by `python -m trainer.samples` in its train command).

    Example: runner compare @last
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from runner.errors import NotFound
    from runner.store import open_store

    with open_store() as store:
        run = store.get_run(run_ref)
    found = sorted(Path(run.run_dir, "artifacts").rglob("samples.json"))
    if not found:
        raise NotFound(
            f"run {run.id} has no samples.json in its artifacts: add `python -m trainer.samples ...`"
            " to its train command and /out/samples.json to its outputs (see jobs/smoke.yaml)"
        )
    samples = json.loads(found[0].read_text(encoding="utf-8"))
    if as_json:
        _emit_json(samples)
        return
    table = Table(title=f"{run.id}: before and after fine-tuning", show_lines=True)
    for heading in ("prompt", "before", "after"):
        table.add_column(heading, overflow="fold")
    for sample in samples["samples"]:
        # Text, not markup: an answer's own brackets, and the stop reason's, are shown as written.
        cells = (sample["prompt"], _answer_cell(sample, "before"), _answer_cell(sample, "after"))
        table.add_row(*map(Text, cells))
    Console().print(table)


def _answer_cell(sample: dict, side: str) -> str:
    """An answer, then why it stopped, "eos" (the model ended it) or "length" (cut by a cap or
    the context), and its tokens; samples.json files written before stop reasons show the text only."""
    reason = sample.get(f"{side}_stop_reason")
    if reason is None:
        return sample[side]
    return f"{sample[side]}\n[{reason}, {sample[f'{side}_tokens']} tokens]"


@main.command("diff")
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@json_option
@_errors_handled
def diff_runs(run_a: str, run_b: str, as_json: bool) -> None:
    """What differs between two runs: spec fields, image and layers, inputs, trainer
    configuration, versions, final metrics and artifacts (from their manifests).

    Example: runner diff smoke-20261201-120000-ab12cd smoke-20261202-090000-ef34ab --json
    """
    from runner import manifest
    from runner.diff import differences
    from runner.errors import NotFound
    from runner.store import open_store

    with open_store() as store:
        runs = [store.get_run(run_a), store.get_run(run_b)]
        manifests = [manifest.read(run, store) for run in runs]
    for run, recorded in zip(runs, manifests, strict=True):
        if not recorded:
            raise NotFound(f"run {run.id} has no manifest (its folder {run.run_dir} was removed?)")
    found = differences(*manifests)
    if as_json:
        _emit_json(
            {"a": runs[0].id, "b": runs[1].id, "same": not found, "differences": [d.to_dict() for d in found]}
        )
        return
    if not found:
        click.echo(f"{runs[0].id} and {runs[1].id}: no differences")
    for difference in found:
        click.echo(difference.line())


@main.command()
@click.argument("run_ref", metavar="RUN")
@json_option
@_errors_handled
def status(run_ref: str, as_json: bool) -> None:
    """Show one run (by id, unique id prefix, or @last): its phases, artifacts and loss.

    Example: runner status @last --json
    """
    from runner.attach import remote_state
    from runner.pipeline import run_status
    from runner.runlock import holder

    result = run_status(run_ref)
    left = remote_state(run_ref)
    driver = holder(result.run.id)
    if as_json:
        _emit_json({**result.to_dict(), "left_running": left and left.to_dict(), "driven_by_pid": driver})
        return
    _print_result(result)
    _print_loss_line(Path(result.run.run_dir) / "metrics.jsonl")
    if result.run.status == "running" and driver is None:
        click.echo(f"  no runner process drives this run any more: `runner resume {result.run.id}`")
    if left is not None:
        code = "" if left.exit_code is None else f" (exit code {left.exit_code})"
        click.echo(f"  {left.name} left running on {left.host}: now {left.state}{code}")


def _print_loss_line(metrics: Path) -> None:
    """The training loss as a sparkline, first and last value (when the run has metrics)."""
    from runner.plot import read_curves, sparkline

    loss = read_curves(metrics, "").loss
    if loss:
        values = [loss[step] for step in sorted(loss)]
        click.echo(f"  loss  {sparkline(values)}  {values[0]:.4g} -> {values[-1]:.4g} ({len(values)} steps)")


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.option("-f", "--follow", is_flag=True, help="Follow the run, or a step it left running on its host.")
@_errors_handled
def logs(run_ref: str, follow: bool) -> None:
    """Print a run's step logs. With -f, follow the run: while a runner process drives it (a
    detached submit, another terminal), until that process ends; else a step left running on
    its host, until the step ends.

    Example: runner logs smoke-2026 -f
    """
    from runner import attach, runlock

    run = attach.find_run(run_ref)
    files = attach.local_logs(run)
    shown: dict[Path, int] = {}
    for path in files:
        if len(files) > 1:
            _announce_log(path)
        data = path.read_bytes()
        sys.stdout.buffer.write(data)
        shown[path] = len(data)
    sys.stdout.flush()
    if not follow:
        return
    if runlock.holder(run.id) is not None:
        final = attach.tail_local(run.id, _write_through, shown, _announce_log)
        click.echo(f"run {final.id} {final.status}" + (f": {final.error}" if final.error else ""), err=True)
        sys.exit(0 if final.status == "succeeded" else 1)
    ended = attach.follow(run.id, _write_through)
    if ended is None:
        click.echo(f"run {run.id} has no step left running on a host", err=True)
        return
    click.echo(f"{ended.name} on {ended.host} exited with code {ended.exit_code}", err=True)
    sys.exit(0 if ended.exit_code == 0 else 1)


def _announce_log(path: Path) -> None:
    click.echo(f"==> {path.name} <==", err=True)


def _write_through(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


@main.command()
@click.argument("run_ref", metavar="RUN")
@_errors_handled
def stop(run_ref: str) -> None:
    """Stop the step a run left running on its host (SIGTERM, then SIGKILL after 30 s).

    Example: runner stop smoke-20261201-120000-ab12cd
    """
    from runner import attach

    ended = attach.stop(run_ref)
    click.echo(f"stopped {ended.name} on {ended.host} (exit code {ended.exit_code})", err=True)


@main.command()
@click.option("-n", "--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@json_option
@_errors_handled
def runs(limit: int, as_json: bool) -> None:
    """List recent runs, newest first.

    Example: runner runs -n 5 --json
    """
    from runner.pipeline import list_runs

    records = list_runs(limit)
    if as_json:
        _emit_json({"runs": [vars(r) for r in records]})
        return
    if not records:
        click.echo("no runs yet", err=True)
        return
    click.echo(f"{'RUN':<44} {'STATUS':<12} {'EXIT':>4}  CREATED")
    for record in records:
        created = datetime.fromtimestamp(record.created_at).strftime("%Y-%m-%d %H:%M:%S")
        code = "" if record.exit_code is None else str(record.exit_code)
        click.echo(f"{record.id:<44} {record.status:<12} {code:>4}  {created}")


@main.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@click.option("--since", type=click.DateTime(), help="Runs created at or after (e.g. 2026-12-01).")
@click.option("--until", type=click.DateTime(), help="Runs created before.")
@click.option("--csv", "as_csv", is_flag=True, help="One CSV line per run and currency.")
@json_option
@_errors_handled
def cost(run_ref: str | None, since, until, as_csv: bool, as_json: bool) -> None:
    """What runs cost, from the ledger of billed intervals (no-GPU and GPU mode).

    Without RUN: one line per run (and currency) in the period, then totals per day and
    provider, and per currency (currencies are never added together). With RUN: the run's
    timeline (phase, mode, seconds, cost, and which witness ended each interval).

    Example: runner cost --since 2026-12-01 --csv > december.csv
    """
    import time

    from runner import cost as ledger
    from runner.store import open_store

    now = time.time()
    with open_store() as store:
        if run_ref is not None:
            run = store.get_run(run_ref)
            report = ledger.run_report(run.id, store.ledger(run.id), now)
        else:
            runs = [
                r
                for r in store.list_runs(1_000_000)
                if (since is None or r.created_at >= since.timestamp())
                and (until is None or r.created_at < until.timestamp())
            ]
            report = ledger.runs_report(reversed(runs), store.ledger, now)
    if as_json:
        _emit_json(report)
    elif as_csv:
        click.echo(ledger.runs_csv(report.get("runs", [])), nl=False)
    elif run_ref is not None:
        _print_timeline(report)
    else:
        _print_runs_cost(report)


def _print_timeline(report: dict) -> None:
    _echo_table(
        f"{'PHASE':<10} {'MODE':<4} {'SECONDS':>9} {'RATE/H':>8} {'COST':>10}  SOURCE",
        (
            f"{i['phase'] or '':<10} {i['mode']:<4} {i['seconds']:>9.1f} {i['rate_per_hour']:>8.3f}"
            f" {i['cost']:>10.4f}  {i['source']}"
            for i in report["timeline"]
        ),
    )
    _echo_totals(report)
    if "balance" in report:
        click.echo(f"balance spent {report['balance']['spent']:.4f} (the provider's account, before - after)")


def _print_runs_cost(report: dict) -> None:
    if not report["runs"]:
        click.echo("no billed runs in this period", err=True)
        return
    _echo_table(
        f"{'RUN':<44} {'PROVIDER':<9} {'STATUS':<11} {'GPU H':>7} {'CPU H':>7}"
        f" {'GPU':>9} {'CPU':>9} {'TOTAL':>9} CUR",
        (
            f"{r['run_id']:<44} {r['provider']:<9} {r['status']:<11} {r['gpu_hours']:>7.3f}"
            f" {r['cpu_hours']:>7.3f} {r['gpu_cost']:>9.4f} {r['cpu_cost']:>9.4f} {r['total']:>9.4f}"
            f" {r['currency']}"
            for r in report["runs"]
        ),
    )
    click.echo()
    _echo_table(
        f"{'DAY':<10} {'PROVIDER':<9} {'GPU H':>7} {'CPU H':>7} {'TOTAL':>9} CUR",
        (
            f"{d['day']:<10} {d['provider']:<9} {d['gpu_hours']:>7.3f} {d['cpu_hours']:>7.3f}"
            f" {d['total']:>9.4f} {d['currency']}"
            for d in report["by_day_provider"]
        ),
    )
    _echo_totals(report)


def _echo_table(header: str, lines: Iterable[str]) -> None:
    click.echo(header)
    for line in lines:
        click.echo(line)


def _echo_totals(report: dict) -> None:
    """One total line per currency: amounts in different currencies are never added."""
    for total in report["totals"]:
        click.echo(f"total {total['total']:.4f} {total['currency']}")


@main.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@click.option(
    "--orphans", "all_orphans", is_flag=True, help="Power off every instance no runner process drives."
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=60,
    show_default=True,
    help="Seconds to checkpoint after SIGTERM.",
)
@_errors_handled
def down(run_ref: str | None, all_orphans: bool, grace: float) -> None:
    """Stop billing: RUN's trainer is stopped (SIGTERM first, so it can checkpoint) and its
    instance powered off; with --orphans, every instance running with no runner process behind it.

    Example: runner down --orphans
    """
    from runner import orphans, runlock
    from runner.errors import BadInput
    from runner.store import open_store

    if (run_ref is None) == (not all_orphans):
        raise BadInput("give a RUN or --orphans (not both)")
    with open_store() as store:
        if all_orphans:
            done = orphans.power_off(store, orphans.find(store, cached=False))
            click.echo(
                f"powered off {len(done)} instance(s)" + (f": {', '.join(done)}" if done else ""), err=True
            )
            return
        run_id = store.get_run(run_ref).id
        with runlock.hold(run_id):
            instance = orphans.down_run(store, run_id, grace)
    click.echo(
        f"run {run_id}: " + (f"instance {instance} powered off" if instance else "no instance"), err=True
    )


@main.group()
def image() -> None:
    """Work with a job's image on a remote host."""


@image.command("sync", short_help="Send an image to an SSH host, only the layers it lacks.")
@click.argument("ref", metavar="JOB|IMAGE")
@click.option(
    "--host",
    metavar="[USER@]HOST[:PORT]",
    help="The SSH host (user root, port 22 unless given); replaces the job's. Required for an IMAGE.",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SSH private key file; replaces the job's login.",
)
@click.option(
    "--password-env",
    metavar="NAME",
    help="Environment variable holding the SSH password; replaces the job's login.",
)
@click.option(
    "--data-dir",
    metavar="PATH",
    help="The host's data folder (absolute).  [default: the job's, else /root/runner-data]",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "docker", "rootfs"]),
    help="docker: load into the host's engine; rootfs: unpack for proot; auto: docker if the"
    " login can use an engine.  [default: the job's, else auto]",
)
@click.option("--accept-new-host-key", is_flag=True, help="Accept a changed host key this once and pin it.")
@json_option
@_errors_handled
def image_sync(
    ref: str,
    host: str | None,
    key: Path | None,
    password_env: str | None,
    data_dir: str | None,
    runtime: str | None,
    accept_new_host_key: bool,
    as_json: bool,
) -> None:
    """Send JOB's image (a job spec file) or IMAGE (a tag or ID) to an SSH host.

    Only the layers the host lacks are sent; the image is then loaded into the host's
    Docker engine, or unpacked for proot on a host without Docker, and its ID is checked
    against the local one. Prints bytes sent and skipped, and seconds.

    Example: runner image sync jobs/smoke.yaml --host gpu-box --key ~/.ssh/id_ed25519
    """
    from runner.image_sync import Options, plan, sync_image
    from runner.progress import Progress
    from runner.store import open_store

    options = Options(host, key, password_env, data_dir, runtime, accept_new_host_key)
    image_id, target, registry = plan(ref, options, lambda text: click.echo(text, err=True))
    progress = Progress(sys.stderr, bars=sys.stderr.isatty())
    with open_store() as store:
        try:
            result = sync_image(
                image_id,
                target,
                store,
                accept_new_host_key=accept_new_host_key,
                progress=progress,
                registry=registry,
            )
        finally:
            progress.close()
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


@image.command("plan", short_help="Show where each layer of a job's image would come from.")
@click.argument("job", type=click.Path(path_type=Path))
@json_option
@_errors_handled
def image_plan(job: Path, as_json: bool) -> None:
    """Each layer of JOB's image: its size and its source, before anything moves.

    Layers that the job's base image (image.registry.base, else the Dockerfile's FROM) has at
    a registry or a mirror are fetched by the instance itself; only the rest travel from the
    laptop. Layers the instance already holds are skipped when it syncs.

    Example: runner image plan jobs/llama7b-lora-zh.yaml
    """
    from runner.image_sync import layer_plan, plan_lines

    result = layer_plan(str(job), lambda text: click.echo(text, err=True))
    if as_json:
        _emit_json(result)
    else:
        click.echo("\n".join(plan_lines(result)))


@main.group()
def emulator() -> None:
    """A local AutoDL-style cloud (Docker containers with sshd) to rehearse a job before paying."""


@emulator.command("up")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="127.0.0.1 port; 0 picks a free one.")
@click.option(
    "--boot-delay", type=click.FloatRange(0), default=3.0, show_default=True, help="Seconds in 'starting'."
)
@click.option(
    "--cpu-mode-cpus",
    type=click.FloatRange(0.01),
    default=0.5,
    show_default=True,
    help="CPUs of a no-GPU boot.",
)
@click.option(
    "--cpu-mode-memory", metavar="SIZE", help="Memory cap of a no-GPU boot (e.g. 2g).  [default: none]"
)
@click.option("--balance", type=float, default=100.0, show_default=True, help="Starting balance, CNY.")
@click.option(
    "--gpu-price", type=click.FloatRange(0), default=2.15, show_default=True, help="CNY per hour, GPU mode."
)
@click.option(
    "--cpu-price", type=click.FloatRange(0), default=0.10, show_default=True, help="CNY per hour, no GPU."
)
@_errors_handled
def emulator_up(port, boot_delay, cpu_mode_cpus, cpu_mode_memory, balance, gpu_price, cpu_price) -> None:
    """Start the emulator in the background (builds its instance image if missing); print its URL.

    The API token is kept in $RUNNER_HOME/emulator/token and never printed.

    Example: runner emulator up --boot-delay 2
    """
    from infra.emulator.control import UpOptions, up

    options = UpOptions(port, boot_delay, cpu_mode_cpus, cpu_mode_memory, balance, gpu_price, cpu_price)
    url = up(options)
    click.echo(url)
    click.echo("emulator running; stop it with: runner emulator down", err=True)


@emulator.command("down")
@click.option("--purge", is_flag=True, help="Also remove the instances' containers and the emulator's state.")
@_errors_handled
def emulator_down(purge: bool) -> None:
    """Power every instance off (recorded in the power log) and stop the emulator.

    Example: runner emulator down --purge
    """
    from infra.emulator.control import down

    was_running = down(purge=purge)
    click.echo(("emulator stopped" if was_running else "no emulator was running")
               + ("; containers and state removed" if purge else ""), err=True)  # fmt: skip


@emulator.command("status")
@json_option
@_errors_handled
def emulator_status(as_json: bool) -> None:
    """The running emulator's URL, balance and instances.

    Example: runner emulator status --json
    """
    from infra.emulator.control import status as emulator_state

    state = emulator_state()
    if as_json:
        _emit_json(state)
        return
    click.echo(f"url: {state['url']}")
    click.echo(f"balance: {state['balance']:.4f} CNY (spent {state['spent']:.4f})")
    click.echo(f"{'INSTANCE':<22} {'STATUS':<14} {'MODE':<8} SSH PORT")
    for item in state["instances"]:
        click.echo(f"{item['uuid']:<22} {item['status']:<14} {item['mode']:<8} {item['ssh_port'] or ''}")


def _print_result(result) -> None:
    run = result.run
    click.echo(f"run {run.id}: {run.status}" + (f" ({run.error})" if run.error else ""))
    for phase in result.phases:
        seconds = "" if phase.seconds is None else f"{phase.seconds:8.1f}s"
        detail = f"  {phase.detail}" if phase.detail else ""
        click.echo(f"  {phase.name:<10} {phase.status:<12} {seconds}{detail}")
    for artifact in result.artifacts:
        click.echo(f"  {artifact.path}  {artifact.bytes} bytes  sha256:{artifact.sha256[:16]}")
    click.echo(f"  folder: {run.run_dir}")
