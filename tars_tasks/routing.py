"""Role → tier routing and the limits on what a tier accepts."""

from __future__ import annotations

from dataclasses import dataclass

from config.catalog import Catalog
from config.keys import TIERS, queue_for_tier
from tars_tasks.errors import InvalidRequest
from tars_tasks.schemas import RequestSpec


@dataclass(frozen=True, slots=True)
class Route:
    tier: str
    queue: str
    model: str


def route(spec: RequestSpec, *, catalog: Catalog, max_prompt_chars: int) -> Route:
    """Pick the tier for a request; raise :class:`InvalidRequest` for what no tier takes."""
    if spec.role not in catalog.roles:
        raise InvalidRequest(
            f"unknown role {spec.role!r}: known roles are {', '.join(sorted(catalog.roles))}", field="role"
        )
    tier = spec.tier or catalog.roles[spec.role]
    if tier not in TIERS or tier not in catalog.tiers:
        raise InvalidRequest(f"unknown tier {tier!r}: tiers are {', '.join(TIERS)}", field="tier")
    if not spec.prompt or not spec.prompt.strip():
        raise InvalidRequest("prompt is empty", field="prompt")
    if len(spec.prompt) > max_prompt_chars:
        raise InvalidRequest(
            f"prompt has {len(spec.prompt)} characters; the limit is {max_prompt_chars}", field="prompt"
        )
    return Route(tier=tier, queue=queue_for_tier(tier), model=catalog.spec(tier).model)
