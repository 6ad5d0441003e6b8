"""The fleet's topology: every service an operator runs and the one command line of each.

``docker-compose.yml`` and ``tars fleet up`` (the local runner) are both derived from this
module, and ``tests/ops`` checks that the compose file says what this module says, so the
two ways of running the fleet cannot drift apart. A command starts with ``tars``: in the
image it is the installed entry point; the local runner replaces that word with
``python -m tars_tasks.cli`` of its own interpreter.

Host and port are *container* values here (``0.0.0.0`` and a fixed port); the local
runner substitutes its own with :meth:`Service.argv`, never other options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from config.keys import TIERS

#: Ports inside the compose network (and defaults of the local runner).
FLOWER_PORT = 5555
MOCK_LLM_PORT = 8090
METRICS_PORT = 9108
CONTAINER_HOST = "0.0.0.0"  # containers listen in their own network namespace

#: Seconds compose waits after SIGTERM before SIGKILL. A Celery warm shutdown finishes the
#: tasks it holds; the longest tier's retry budget (opus: 240 s) plus the group commit fits.
WORKER_STOP_GRACE_S = 300
SERVICE_STOP_GRACE_S = 30



ROLE_WORKER = "worker"
ROLE_FLOWER = "flower"
ROLE_MOCK_LLM = "mock-llm"
ROLE_BATCH_RUNNER = "batch-runner"
ROLE_METRICS = "metrics"
ROLE_MIGRATE = "migrate"
ROLE_LOADGEN = "loadgen"
ROLE_CHECK = "check"


@dataclass(frozen=True, slots=True)
class Service:
    """One compose service / one kind of local process."""

    name: str
    role: str
    #: The command, starting with ``tars``. For ``loadgen`` it is the compose entrypoint.
    command: tuple[str, ...]
    tier: str | None = None
    #: Port the service listens on (``--port`` in ``command``), if any.
    port: int | None = None
    #: Runs until stopped (gets a healthcheck and a restart policy) or runs once.
    long_running: bool = True
    #: Default arguments after ``command`` (compose ``command:`` of an entrypoint service).
    default_args: tuple[str, ...] = ()
    healthcheck: tuple[str, ...] = ()
    stop_grace_s: int = SERVICE_STOP_GRACE_S
    #: Compose profile; services with a profile are not started by a plain ``up``.
    profile: str | None = None
    #: Started by the local runner (``tars fleet up``) too.
    local: bool = True
    depends: tuple[str, ...] = field(default=())

    def argv(self, *, host: str | None = None, port: int | None = None) -> list[str]:
        """``command`` with ``--host``/``--port`` replaced, for a process outside compose."""
        out = list(self.command)
        for flag, value in (("--host", host), ("--port", None if port is None else str(port))):
            if value is None:
                continue
            if flag not in out:
                raise ValueError(f"service {self.name} has no {flag} option")
            out[out.index(flag) + 1] = value
        return out


def worker_service(tier: str) -> Service:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}: tiers are {', '.join(TIERS)}")
    return Service(
        name=f"worker-{tier}",
        role=ROLE_WORKER,
        command=("tars", "worker", "--tier", tier),
        tier=tier,
        healthcheck=("tars", "fleet", "healthcheck", "worker", "--tier", tier),
        stop_grace_s=WORKER_STOP_GRACE_S,
        depends=("migrate", "redis"),
    )


FLOWER = Service(
    name="flower",
    role=ROLE_FLOWER,
    command=("tars", "flower", "--host", CONTAINER_HOST, "--port", str(FLOWER_PORT)),
    port=FLOWER_PORT,
    healthcheck=("tars", "fleet", "healthcheck", "http", f"http://127.0.0.1:{FLOWER_PORT}/healthcheck"),
    depends=("redis",),
)

MOCK_LLM = Service(
    name="mock-llm",
    role=ROLE_MOCK_LLM,
    command=("tars", "mock-llm", "--host", CONTAINER_HOST, "--port", str(MOCK_LLM_PORT)),
    port=MOCK_LLM_PORT,
    healthcheck=("tars", "fleet", "healthcheck", "tcp", "--port", str(MOCK_LLM_PORT)),
)

METRICS = Service(
    name="metrics",
    role=ROLE_METRICS,
    command=("tars", "metrics", "serve", "--host", CONTAINER_HOST, "--port", str(METRICS_PORT)),
    port=METRICS_PORT,
    healthcheck=("tars", "fleet", "healthcheck", "http", f"http://127.0.0.1:{METRICS_PORT}/metrics"),
    depends=("migrate", "redis"),
)

#: The providers' batch lane (workers/batchlane/): forms, submits and polls provider batches and
#: records their results. Several may run (one acts, by a Postgres advisory lock); SIGTERM lets
#: the tick in hand finish, and a SIGKILL anywhere is recovered by the next runner (docs/COST_CONTROLS.md).
BATCH_RUNNER = Service(
    name="batch-runner",
    role=ROLE_BATCH_RUNNER,
    command=("tars", "batch-runner"),
    healthcheck=("tars", "fleet", "healthcheck", "batch-runner"),
    depends=("migrate", "redis"),
)

#: Runs before everything else under compose (every service waits for it to *succeed*):
#: refuses the ``change-me`` placeholder passwords of ``.env.example`` (compose's ``${VAR:?}``
#: only refuses empty values). See tars_tasks/default_passwords.py.
CHECK_SECRETS = Service(
    name="check-secrets",
    role=ROLE_CHECK,
    command=("tars", "fleet", "check-secrets"),
    long_running=False,
    local=False,
)

MIGRATE = Service(
    name="migrate",
    role=ROLE_MIGRATE,
    command=("tars", "db", "upgrade"),
    long_running=False,
    local=False,
    depends=("postgres",),
)

LOADGEN = Service(
    name="loadgen",
    role=ROLE_LOADGEN,
    command=("tars", "loadgen", "run"),
    default_args=("baseline",),
    long_running=False,
    profile="load",
    local=False,
    depends=("migrate", "redis"),
)

#: Provider protocol the workers speak to the mock server when routed to it.
MOCK_LLM_PROTOCOL = "anthropic"
#: The mock checks no key unless told to; the provider client still needs one to be set.
MOCK_LLM_DEFAULT_KEY = "mock-key-not-a-secret"


def mock_route_env(*, base_url: str, api_key: str = MOCK_LLM_DEFAULT_KEY) -> dict[str, str]:
    """Worker environment that sends every model call to the mock LLM server at ``base_url``
    (compose.mock-llm.yml in compose, ``tars fleet up --route-to-mock-llm`` locally)."""
    return {"TARS_PROVIDER_OVERRIDE": MOCK_LLM_PROTOCOL, "TARS_PROVIDER_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": api_key}


WORKERS: tuple[Service, ...] = tuple(worker_service(t) for t in TIERS)

#: Every project-image service, in start order.
SERVICES: tuple[Service, ...] = (CHECK_SECRETS, MIGRATE, MOCK_LLM, METRICS, FLOWER, *WORKERS, BATCH_RUNNER, LOADGEN)

#: The secret-bearing variables each project service's environment holds under compose, and
#: no others: provider API keys reach the workers only, the database URL only what reads or
#: writes rows, Flower's password Flower (and the check) only. ``TARS_BROKER_URL`` carries the
#: Redis password. tests/ops/test_compose.py holds the compose file to this.
SECRET_VARIABLES = ("TARS_BROKER_URL", "TARS_DATABASE_URL", "POSTGRES_PASSWORD", "REDIS_PASSWORD",
                    "TARS_FLOWER_PASSWORD", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")
SERVICE_SECRETS: dict[str, frozenset[str]] = {
    CHECK_SECRETS.name: frozenset({"TARS_BROKER_URL", "TARS_DATABASE_URL", "POSTGRES_PASSWORD", "REDIS_PASSWORD",
                                   "TARS_FLOWER_PASSWORD"}),
    MIGRATE.name: frozenset({"TARS_DATABASE_URL"}),
    MOCK_LLM.name: frozenset(),
    METRICS.name: frozenset({"TARS_BROKER_URL", "TARS_DATABASE_URL"}),
    FLOWER.name: frozenset({"TARS_BROKER_URL", "TARS_FLOWER_PASSWORD"}),
    **{w.name: frozenset({"TARS_BROKER_URL", "TARS_DATABASE_URL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"})
       for w in WORKERS},
    # it calls the providers' batch APIs with the workers' keys
    BATCH_RUNNER.name: frozenset({"TARS_BROKER_URL", "TARS_DATABASE_URL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"}),
    LOADGEN.name: frozenset({"TARS_BROKER_URL", "TARS_DATABASE_URL"}),
}


def service(name: str) -> Service:
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(f"no service {name!r}: services are {', '.join(s.name for s in SERVICES)}")


def local_prefix(python: str) -> list[str]:
    """What replaces the leading ``tars`` of a command outside the image."""
    return [python, "-m", "tars_tasks.cli"]


def localise(command: Sequence[str], *, python: str) -> list[str]:
    if not command or command[0] != "tars":
        raise ValueError(f"a topology command starts with 'tars', not {list(command)[:1]}")
    return [*local_prefix(python), *command[1:]]
