"""Role → tier routing for a request that :func:`tars_tasks.schemas.validate_spec` accepted."""

from __future__ import annotations

from dataclasses import dataclass

from config.catalog import Catalog
from config.keys import TIERS, queue_for_tier
from tars_tasks.errors import InvalidRequest, excerpt
from tars_tasks.schemas import RequestSpec


@dataclass(frozen=True, slots=True)
class Route:
    tier: str
    queue: str
    model: str


def route(spec: RequestSpec, *, catalog: Catalog) -> Route:
    """Pick the tier for a request: its explicit ``tier``, else its role's.

    ``validate_spec`` has checked both against the catalog; a spec checked against another
    catalog still cannot reach a tier that does not exist (:class:`InvalidRequest`).
    """
    if spec.role not in catalog.roles:
        raise InvalidRequest(f"unknown role {excerpt(spec.role)}: known roles are "
                             + ", ".join(sorted(catalog.roles)), field="role")
    tier = spec.tier or catalog.roles[spec.role]
    if tier not in TIERS or tier not in catalog.tiers:
        raise InvalidRequest(f"unknown tier {excerpt(tier)}: tiers are {', '.join(TIERS)}", field="tier")
    return Route(tier=tier, queue=queue_for_tier(tier), model=catalog.spec(tier).model)
