"""The one table of providers. Cloud SDKs are imported inside each provider, not here."""

from __future__ import annotations

from collections.abc import Callable

from infra.base import Provider
from infra.local import LocalProvider
from infra.rented import RentedProvider
from infra.ssh import SshProvider

# Each entry builds the provider from the spec's validated `provider` section and the
# command line's one-off choices (accept_new_host_key: re-pin a changed SSH host key this once).
PROVIDERS: dict[str, Callable[..., Provider]] = {
    "local": lambda settings, accept_new_host_key: LocalProvider(),
    "ssh": SshProvider,
    "autodl": RentedProvider,
    "emulator": RentedProvider,
    "aws": RentedProvider,
}


def provider_for(settings, *, accept_new_host_key: bool = False) -> Provider:
    """The provider for a spec's `provider` section (its type was validated by the spec)."""
    return PROVIDERS[settings.type](settings, accept_new_host_key)
