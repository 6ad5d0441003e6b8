"""``tars budget``: set and show tenants' budgets (USD per UTC day and month; tars_tasks/budgets.py)."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation

import click

from tars_tasks.errors import ConfigurationError


@click.group("budget")
def budget() -> None:
    """Tenants' budgets: at 80% their work moves to cheaper tiers, spent they are refused (BudgetExceeded)."""


def _budgets():
    from config.settings import get_settings
    from tars_tasks.budgets import Budgets

    settings = get_settings()
    b = Budgets.for_settings(settings)
    if b is None:
        raise ConfigurationError("budgets need the fleet's Redis: set TARS_BROKER_URL (or TARS_REDIS_URL)")
    return b


def _usd(value: str | None, name: str) -> Decimal | None:
    if value is None:
        return None
    try:
        usd = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not an amount of dollars", param_hint=name) from None
    if not usd.is_finite() or usd < 0:
        raise click.BadParameter(f"{value!r}: give a non-negative amount of dollars", param_hint=name)
    return usd


@budget.command("set")
@click.argument("tenant")
@click.option("--day", "day", metavar="USD", help="Limit per UTC day.")
@click.option("--month", "month", metavar="USD", help="Limit per UTC month.")
@click.option("--clear", is_flag=True, help="Remove the tenant's limits (named by --day/--month, else both).")
def set_budget(tenant: str, day: str | None, month: str | None, clear: bool) -> None:
    """Set TENANT's budget: ``tars budget set acme --day 50 --month 1000``; TENANT '*' is the
    fleet-wide budget, which binds every tenant's calls together."""
    from tars_tasks.budgets import FLEET
    from tars_tasks.errors import InvalidRequest
    from tars_tasks.schemas import validate_tenant

    try:
        if tenant != FLEET:  # '*': the fleet-wide budget
            validate_tenant(tenant)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc), param_hint="TENANT") from None
    b = _budgets()
    if clear:
        for period in [p for p, v in (("day", day), ("month", month)) if v is not None] or ["day", "month"]:
            b.set_limit(tenant=tenant, period=period, usd=None)
        click.echo(f"budget of {tenant} cleared")
        return
    limits = {"day": _usd(day, "--day"), "month": _usd(month, "--month")}
    if all(v is None for v in limits.values()):
        raise click.UsageError("give --day and/or --month (or --clear)")
    for period, usd in limits.items():
        if usd is not None:
            b.set_limit(tenant=tenant, period=period, usd=usd)
    click.echo(f"budget of {tenant}: " + ", ".join(f"{p} ${v}" for p, v in limits.items() if v is not None))


@budget.command("show")
@click.argument("tenant", required=False)
@click.option("--json", "as_json", is_flag=True)
def show_budget(tenant: str | None, as_json: bool) -> None:
    """Every tenant's budget (or TENANT's): limit, spent, reserved in flight, share used."""
    b = _budgets()
    tenants = [tenant] if tenant else b.tenants()
    states = {t: [st.as_dict() for st in b.state(t)] for t in tenants}
    if as_json:
        click.echo(json.dumps(states, indent=2))
        return
    if not states:
        click.echo("no budgets set")
        return
    for t, periods in states.items():
        for p in periods:
            if p["limit_usd"] is None:
                continue
            click.echo(f"{t}\t{p['period']}\tlimit ${p['limit_usd']}\tspent ${p['spent_usd']}\treserved "
                       f"${p['reserved_usd']}\tused {p['used']:.1%}\texpired reservations {p['expired']}")
