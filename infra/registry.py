"""The one table of providers. Cloud SDKs are imported inside each provider, not here."""

from __future__ import annotations

from infra.base import Provider
from infra.local import LocalProvider

PROVIDERS: dict[str, type] = {
    "local": LocalProvider,
}


def provider_for(settings) -> Provider:
    """The provider for a spec's `provider` section (its type was validated by the spec)."""
    return PROVIDERS[settings.type]()
