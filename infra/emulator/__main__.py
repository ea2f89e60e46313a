"""`python -m infra.emulator serve ...`: the emulator's server process (what `up` detaches).

It binds 127.0.0.1 only, writes `server.json` once it answers, and on SIGTERM/SIGINT
powers every instance off (booked in the power log) before it exits, so `runner emulator
down` never leaves a container running or a GPU interval open.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from infra.emulator import instances
from infra.emulator.server import EmulatorServer
from infra.emulator.service import Emulator
from infra.emulator.state import Config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infra.emulator")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the emulator in the foreground")
    serve.add_argument("--home", type=Path, required=True, help="state folder (holds the token file)")
    serve.add_argument("--port", type=int, default=0, help="127.0.0.1 port; 0 picks a free one")
    serve.add_argument("--image", help="instance image tag (default: the built one for this Dockerfile)")
    serve.add_argument("--boot-delay", type=float, default=Config.boot_delay)
    serve.add_argument("--cpu-mode-cpus", type=float, default=Config.cpu_mode_cpus)
    serve.add_argument("--cpu-mode-memory", default=None)
    serve.add_argument("--balance", type=float, default=Config.balance)
    serve.add_argument("--gpu-price", type=float, default=Config.gpu_price)
    serve.add_argument("--cpu-price", type=float, default=Config.cpu_price)
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> None:
    config = Config(args.boot_delay, args.cpu_mode_cpus, args.cpu_mode_memory, args.balance,
                    args.gpu_price, args.cpu_price)  # fmt: skip
    token = (args.home / "token").read_text(encoding="utf-8").strip()
    emulator = Emulator(args.home, config, args.image or instances.image_tag())
    server = EmulatorServer(("127.0.0.1", args.port), emulator, token)
    info = args.home / "server.json"
    fd = os.open(info, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"url": server.url, "port": server.server_address[1], "pid": os.getpid()}, handle)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"emulator serving on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        emulator.close(power_off=True)
        info.unlink(missing_ok=True)
        print("emulator stopped; instances powered off", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
