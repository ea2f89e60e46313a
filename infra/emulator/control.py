"""What `runner emulator up|down|status` do: start the server detached, stop it, report.

The server runs as its own session (it survives the terminal), writes its URL and pid to
`server.json`, and reads the token from a 0600 file: the token never appears on a
command line, in the terminal or in the log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.emulator import NOT_RUNNING, connection, emulator_home, instances, server_info
from infra.emulator.state import Config
from runner.errors import BadInput, ProviderFailure
from runner.home import private_dir

BASE_ENV = "RUNNER_EMULATOR_BASE"  # base image for building the instance image (tests, offline)


@dataclass(frozen=True)
class UpOptions:
    port: int = 0
    boot_delay: float = Config.boot_delay
    cpu_mode_cpus: float = Config.cpu_mode_cpus
    cpu_mode_memory: str | None = None
    balance: float = Config.balance
    gpu_price: float = Config.gpu_price
    cpu_price: float = Config.cpu_price


def ensure_token(home: Path) -> None:
    path = home / "token"
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")


def up(options: UpOptions, home: Path | None = None, timeout: float = 30) -> str:
    """Build the instance image if missing, start the server detached; return its URL."""
    home = private_dir(home or emulator_home())
    running = server_info(home)
    if running is not None:
        url = running["url"]
        raise BadInput(f"an emulator is already running at {url}; stop it with runner emulator down")
    ensure_token(home)
    image = instances.ensure_image(os.environ.get(BASE_ENV))
    argv = [sys.executable, "-m", "infra.emulator", "serve", "--home", str(home), "--image", image,
            "--port", str(options.port), "--boot-delay", str(options.boot_delay),
            "--cpu-mode-cpus", str(options.cpu_mode_cpus), "--balance", str(options.balance),
            "--gpu-price", str(options.gpu_price), "--cpu-price", str(options.cpu_price)]  # fmt: skip
    if options.cpu_mode_memory:
        argv += ["--cpu-mode-memory", options.cpu_mode_memory]
    log = home / "emulator.log"
    fd = os.open(log, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    repo = Path(__file__).resolve().parents[2]
    with os.fdopen(fd, "ab") as handle:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle,
                                   start_new_session=True, cwd=repo)  # fmt: skip
    (home / "emulator.pid").write_text(f"{process.pid}\n", encoding="utf-8")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = server_info(home)
        if info and info.get("pid") == process.pid:
            return str(info["url"])
        if process.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-10:]
    raise ProviderFailure("the emulator did not start", details=tail)


def down(*, purge: bool = False, home: Path | None = None, timeout: float = 60) -> bool:
    """Stop the server (it powers every instance off first); with purge, remove containers
    and the state folder. Returns whether a server was running."""
    home = home or emulator_home()
    info = server_info(home)
    if info is None and not purge:
        raise BadInput(NOT_RUNNING)
    if info is not None:
        pid = int(info["pid"])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            raise ProviderFailure(f"the emulator (pid {pid}) did not stop within {timeout:.0f}s")
    if purge and home.exists():
        for name in instances.containers_of(home):
            instances.remove(name)
        shutil.rmtree(home)
    return info is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # our own child (in tests): reap it so it does not linger as a zombie
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def status(home: Path | None = None) -> dict:
    """URL, instances (uuid, status, mode, ssh port) and balance of the running emulator."""
    url, token = connection(home)
    request = urllib.request.Request(url + "/emulator/v1/state", headers={"Authorization": token})
    with urllib.request.urlopen(request, timeout=10) as answer:
        state = json.loads(answer.read())["data"]
    return {
        "url": url,
        "balance": round(state["balance"], 4),
        "spent": round(state["spent"], 4),
        "instances": [
            {"uuid": i["uuid"], "name": i["instance_name"], "status": i["status"],
             "mode": i["start_mode"], "ssh_port": i["ssh_port"]}
            for i in state["instances"]
        ],
    }  # fmt: skip
