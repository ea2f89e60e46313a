"""The user's configuration file: settings that belong to the person, not to one job.

`$XDG_CONFIG_HOME/runner/config.toml` (or the file RUNNER_CONFIG names). It is optional; a
file that exists but does not parse or validate is an error naming the file, never ignored.
Today it holds hourly rates per provider, for the estimates and the ledger where a provider
does not report its own prices:

    [pricing.aws]
    currency = "USD"
    cpu_per_hour = 0.0832
    gpu_per_hour = 1.006
    types = { "g4dn.xlarge" = 0.526, "t3.large" = 0.0832 }   # per instance type, wins over the above
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import ValidationError

from runner.errors import BadInput
from runner.spec import Currency, Money, Strict

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

CONFIG_ENV = "RUNNER_CONFIG"


class ProviderPricing(Strict):
    """Hourly rates of one provider type: per mode, and per instance type where it has them."""

    currency: Currency | None = None
    cpu_per_hour: Money | None = None
    gpu_per_hour: Money | None = None
    types: dict[str, Money] = {}


class UserConfig(Strict):
    pricing: dict[str, ProviderPricing] = {}


def config_path() -> Path:
    configured = os.environ.get(CONFIG_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("runner", appauthor=False)) / "config.toml"


def load_user_config() -> UserConfig:
    """The user's configuration (empty without a file)."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return UserConfig()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None
    try:
        return UserConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadInput(f"{path}: {where}: {first['msg']}") from None
