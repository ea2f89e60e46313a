"""The user's configuration file: settings that belong to the person, not to one job.

`$XDG_CONFIG_HOME/runner/config.toml` (or the file RUNNER_CONFIG names). It is optional; a
file that exists but does not parse or validate is an error naming the file, never ignored.
It holds defaults, references to credentials (the names of the variables that hold them,
never the values), and hourly rates per provider for the estimates and the ledger where a
provider does not report its own prices:

    [defaults]
    out = "~/runs"                  # where runs/<id>/ go when --out is not given

    [credentials]
    autodl_token_env = "AUTODL_TOKEN_WORK"   # for specs that do not set provider.token_env

    [pricing.aws]
    currency = "USD"
    cpu_per_hour = 0.0832
    gpu_per_hour = 1.006
    types = { "g4dn.xlarge" = 0.526, "t3.large" = 0.0832 }   # per instance type, wins over the above

    [registry.autodl]
    mirrors = ["https://docker.m.daocloud.io"]  # tried after the job's image.registry.mirrors
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import ValidationError

from runner.errors import BadInput
from runner.spec import AutodlProvider, Currency, EnvName, MirrorUrl, Money, Strict

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


class ProviderRegistry(Strict):
    """Registry mirrors near one provider type's instances (say, a regional Docker Hub mirror)."""

    mirrors: list[MirrorUrl] = []


class Defaults(Strict):
    out: str | None = None  # the folder for runs/<id>/ when --out is not given


class Credentials(Strict):
    """Where credentials are found: variable names, never values."""

    autodl_token_env: EnvName | None = None


class UserConfig(Strict):
    defaults: Defaults = Defaults()
    credentials: Credentials = Credentials()
    pricing: dict[str, ProviderPricing] = {}
    registry: dict[str, ProviderRegistry] = {}


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


def runs_folder(given: Path | None) -> Path:
    """--out if given, else the config's defaults.out, else ./runs."""
    if given is not None:
        return given
    configured = load_user_config().defaults.out
    return Path(configured).expanduser() if configured else Path("runs")


def autodl_token_env(settings: AutodlProvider) -> str:
    """The variable holding the AutoDL token: the spec's provider.token_env when it sets one,
    else the config's credentials.autodl_token_env, else AUTODL_TOKEN."""
    if "token_env" in settings.model_fields_set:
        return settings.token_env
    return load_user_config().credentials.autodl_token_env or settings.token_env
