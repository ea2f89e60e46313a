"""What an hour costs in each power mode, from the most direct source that knows.

In order: the provider's own price for the instance (AutoDL and the emulator report it), the
job spec's `pricing`, the user's config file (runner/config.py: per provider, and per instance
type where the provider has types), else nothing (0: the ledger still counts the seconds).
"""

from __future__ import annotations

from infra.base import Instance, PowerMode
from runner.config import ProviderPricing, load_user_config
from runner.spec import AwsProvider, JobSpec, Pricing


def for_job(spec: JobSpec) -> Pricing:
    """The job's rates before any instance reports its own: the spec's, completed from the
    user's config file field by field."""
    given = spec.pricing.model_fields_set
    configured = load_user_config().pricing.get(spec.provider.type, ProviderPricing())
    rates = {}
    for field in ("currency", "cpu_per_hour", "gpu_per_hour"):
        value = getattr(spec.pricing, field)
        if field not in given:
            value = _by_type(spec, field, configured) or getattr(configured, field) or value
        rates[field] = value
    return Pricing(**rates)


def _by_type(spec: JobSpec, field: str, configured: ProviderPricing) -> float | None:
    """The configured rate of the instance type that mode boots as (AWS), if any."""
    if not isinstance(spec.provider, AwsProvider) or field == "currency":
        return None
    instance_type = spec.provider.gpu_type if field == "gpu_per_hour" else spec.provider.cpu_type
    return configured.types.get(instance_type)


def rate(spec: JobSpec, instance: Instance, mode: PowerMode) -> tuple[float, str]:
    """The hourly price of an instance in mode, and its currency."""
    reported = instance.price_per_hour.get(mode)
    if reported:
        return reported, instance.currency
    rates = for_job(spec)
    return (rates.gpu_per_hour if mode is PowerMode.GPU else rates.cpu_per_hour), rates.currency
