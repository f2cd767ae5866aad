"""The test's tenant: the user, key and agent a load test runs as, and their cleanup.

With an administrator's key the tester makes its own user, with quotas raised for the test
(requests a minute, open sessions, replicas, cores), and one agent sized for the load, and
afterwards deletes the agent and revokes the user's key (the API has no way to delete a user;
with its only key revoked it can do nothing). With a tenant's key it uses that user as it is,
within its quotas, and deletes only the agent it made.

The agent has no ``bash`` (``isolation: shared``, no VM slot): the tool mix calls
``write_file``, which works in the session's workspace and needs no sandbox.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from .users import MAX_OPEN_SESSIONS, Plan, Target

SETUP_TIMEOUT_S = 60.0
# Deleting an agent drains its replicas (their turns finish first).
DELETE_TIMEOUT_S = 120.0
SESSIONS_PER_REPLICA = 100
SCALE_UP_AT = 0.8
REPLICA_CORES = 0.5
REPLICA_MEMORY_MB = 1024
MAX_REPLICAS = 1000
REQUESTS_PER_MINUTE_MAX = 1_000_000  # the API's ceiling for a user's quota


class SetupError(Exception):
    """The test could not be set up (the API unreachable, the key refused, a quota too low);
    the message says what to do."""


@dataclass(frozen=True)
class Provisioned:
    target: Target
    created_user_id: str | None = None
    created_key_prefix: str | None = None
    # The user's own window, when the tester set it: a 429 under another limit is not its.
    requests_per_minute: int | None = None


def concurrent_sessions(plan: Plan) -> int:
    """Sessions the load may hold open at once (what the agent and quotas are sized for)."""
    if plan.rate is None:
        return plan.users
    if plan.duration_s is None:
        return min(plan.users, MAX_OPEN_SESSIONS)
    return min(MAX_OPEN_SESSIONS, math.ceil(plan.rate * plan.duration_s) + 1)


def agent_spec(
    plan: Plan, anthropic_key: str | None, run_id: str, min_replicas: int = 1
) -> dict[str, Any]:
    """The test's agent; ``min_replicas`` above 1 spreads the sessions from the start (a chaos
    run kills one replica while the others go on)."""
    sessions = concurrent_sessions(plan)
    # The pool adds replicas above 80 % of their sessions: room for the load at that mark.
    replicas = min(MAX_REPLICAS, math.ceil(sessions / (SESSIONS_PER_REPLICA * SCALE_UP_AT)))
    replicas = max(replicas, min_replicas)
    spec: dict[str, Any] = {
        "system": f"You are a load-test agent (hyperfleet loadtest run {run_id}).",
        "tools": ["write_file"] if plan.tools_mix > 0 else [],
        "isolation": "shared",
        "max_sessions": SESSIONS_PER_REPLICA,
        "replicas": {"min": max(1, min(min_replicas, replicas)), "max": replicas},
        "resources": {"cores": REPLICA_CORES, "memory_mb": REPLICA_MEMORY_MB},
    }
    if anthropic_key:
        spec["anthropic_api_key"] = anthropic_key
    return spec


def raised_quotas(plan: Plan, min_replicas: int = 1) -> dict[str, Any]:
    """The created user's quotas: room for the whole test, bounded by the API's ceilings."""
    spec = agent_spec(plan, None, "", min_replicas)
    replicas = int(spec["replicas"]["max"])
    return {
        "max_agents": 2,
        "max_keys": 2,
        "requests_per_minute": REQUESTS_PER_MINUTE_MAX,
        "max_sessions": 2 * concurrent_sessions(plan) + 10,
        "max_replicas": replicas + 1,
        "max_cores": (replicas + 1) * REPLICA_CORES,
    }


async def _call(
    http: aiohttp.ClientSession,
    base_url: str,
    key: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout_s: float = SETUP_TIMEOUT_S,
) -> tuple[int, dict[str, Any]]:
    try:
        async with http.request(
            method,
            base_url + path,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = None
            return response.status, data if isinstance(data, dict) else {}
    except TimeoutError as e:
        raise SetupError(f"{method} {base_url}{path}: no answer in {timeout_s:g} s") from e
    except (aiohttp.ClientError, ValueError) as e:
        raise SetupError(f"cannot reach the API at {base_url}: {e or type(e).__name__}") from e


def _refusal(what: str, status: int, data: dict[str, Any]) -> SetupError:
    error = data.get("error")
    if not isinstance(error, dict):
        error = {}
    detail = f"{status} {error.get('type', 'error')}: {error.get('message', '')}".rstrip(": ")
    if status == 401:
        return SetupError(
            f"{what}: the API refused the key ({detail}); give --api-key, set "
            "HYPERFLEET_API_KEY, or run against the stack whose $HYPERFLEET_HOME/admin.key it is"
        )
    return SetupError(f"{what}: {detail}")


async def provision(
    http: aiohttp.ClientSession,
    base_url: str,
    own_key: str,
    plan: Plan,
    anthropic_key: str | None,
    run_id: str,
    min_replicas: int = 1,
) -> Provisioned:
    """Make what the test runs as: a user and key when ``own_key`` is an administrator's,
    and an agent (with at least ``min_replicas`` replicas).

    Raises:
        SetupError: the API cannot be reached or refused a step.
    """
    status, data = await _call(
        http,
        base_url,
        own_key,
        "POST",
        "/v1/users",
        {"name": f"loadtest-{run_id}", "quotas": raised_quotas(plan, min_replicas)},
    )
    provisioned: Provisioned
    if status == 201:
        key = str(data["api_key"])
        provisioned = Provisioned(
            Target(base_url, key, ""),
            created_user_id=str(data["id"]),
            created_key_prefix=key.split("_")[1],
            requests_per_minute=REQUESTS_PER_MINUTE_MAX,
        )
    elif status == 403:  # not an administrator: the test runs as this user, as it is
        provisioned = Provisioned(Target(base_url, own_key, ""))
    else:
        raise _refusal("creating the test's user", status, data)
    user_key = provisioned.target.api_key
    status, data = await _call(
        http,
        base_url,
        user_key,
        "POST",
        "/v1/agents",
        agent_spec(plan, anthropic_key, run_id, min_replicas),
    )
    if status != 201:
        await release(http, base_url, own_key, provisioned)
        raise _refusal("creating the test's agent", status, data)
    target = Target(base_url, user_key, str(data["id"]))
    return Provisioned(
        target,
        provisioned.created_user_id,
        provisioned.created_key_prefix,
        provisioned.requests_per_minute,
    )


async def release(
    http: aiohttp.ClientSession, base_url: str, own_key: str, provisioned: Provisioned
) -> list[str]:
    """Delete the test's agent and revoke the key the tester made; what could not be undone,
    worded for a person (empty when all went)."""
    problems = []
    target = provisioned.target
    if target.agent_id:
        try:
            status, data = await _call(
                http,
                base_url,
                target.api_key,
                "DELETE",
                f"/v1/agents/{target.agent_id}",
                timeout_s=DELETE_TIMEOUT_S,
            )
            if status not in (200, 204, 404):
                problems.append(str(_refusal(f"deleting agent {target.agent_id}", status, data)))
        except SetupError as e:
            problems.append(f"deleting agent {target.agent_id}: {e}")
    if provisioned.created_key_prefix:
        prefix = provisioned.created_key_prefix
        try:
            status, data = await _call(http, base_url, own_key, "DELETE", f"/v1/keys/{prefix}")
            if status not in (200, 204, 404):
                problems.append(str(_refusal(f"revoking key {prefix}", status, data)))
        except SetupError as e:
            problems.append(f"revoking key {prefix}: {e}")
    return problems
