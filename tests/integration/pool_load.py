"""Session load on one agent's pool, over HTTP, on the autoscaling cluster
(``autoscaling_cluster``): the multi-node pool test (``test_autoscaler_e2e``) and
``benchmarks/pool_ramp.py`` drive the API the same way.

``start_api`` runs the Serve app and its pool controller in that cluster (through the driver
subprocess); ``PoolLoad`` opens, talks to and closes sessions as one user, and keeps every answer
that was not the one expected (a 5xx, a transport error, any other surprise) in ``failures``;
``Talker`` keeps sessions talking on a thread; ``PoolLoad.sample`` is one look at the pool: its
replicas by state from the API, its VMs from Hypercore's List.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster.hypercore import HypercoreClient
from hyperfleet.processes import free_port

from .autoscaling_cluster import Driver, cluster_workloads

HTTP_TIMEOUT_S = 120.0  # above the pool's capacity wait: a session open may wait for a new VM
SERVE_START_TIMEOUT_S = 240.0  # Serve's controller, proxy and ingress on a busy 2-core machine
CAPACITY_WAIT_S = 90.0  # how long an open that found every replica full waits (a VM start)
TALK_PAUSE_S = 0.2  # between a Talker's rounds: talking, not a load test
MAX_SESSIONS = 4
MAX_REPLICAS = 2  # each on its own worker VM: the fixture's cluster allows two


@dataclass(frozen=True)
class Api:
    base_url: str
    admin_key: str


def start_api(
    driver: Driver, root: Path, anthropic_base_url: str, anthropic_api_key: str, workspaces: Path
) -> Api:
    """The API on the driver's cluster, its pools observed twice a second, agents allowed
    cooldowns of a second or so (the platform's floor for scaling down is 30 s), and no warm pool
    (an idle VM must go); returns where it listens and an administrator's key."""
    config = {
        "runtime": {
            "anthropic_base_url": anthropic_base_url,
            "anthropic_api_key": anthropic_api_key,
            "workspaces": str(workspaces),
        },
        "ip_requests_per_minute": 100_000,
        "pool": {
            "warm_floor": 0,
            "warm_spare": 0,
            "tick_s": 0.5,
            "min_scale_down_cooldown_s": 1,
            "capacity_wait_s": CAPACITY_WAIT_S,
        },
    }
    answer = driver.call(
        "serve_api",
        SERVE_START_TIMEOUT_S,
        port=free_port(),
        control_path=str(root / "control.db"),
        config=config,
    )
    return Api(answer["base_url"], answer["admin_key"])


def vm_agent_spec(
    max_sessions: int = MAX_SESSIONS, max_replicas: int = MAX_REPLICAS
) -> dict[str, Any]:
    """An agent whose replicas each take a whole worker VM (``isolation: vm``; the head has no VM
    slot), with cooldowns short enough for a ramp of a minute or two."""
    return {
        "system": "You answer briefly.",
        "isolation": "vm",
        "max_sessions": max_sessions,
        "resources": {"cores": 0.5, "memory_mb": 256},
        "replicas": {
            "min": 1,
            "max": max_replicas,
            "scale_up_cooldown_s": 1,
            "scale_down_cooldown_s": 3,
        },
    }


@dataclass(frozen=True)
class Sample:
    """One look at the pool: ``sessions`` the client holds open, ``hosted`` as the replicas
    count them, replicas desired and by state, and the cluster's worker workloads (VMs)."""

    t: float
    sessions: int
    hosted: int
    desired: int
    ready: int
    starting: int
    draining: int
    vms: int

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


class PoolLoad:
    """One user's sessions on one agent, through the API.

    Thread-safe where it must be: ``failures`` and ``requests`` take answers from a ``Talker``'s
    thread (with its own HTTP client) as well."""

    def __init__(
        self, api: Api, hypercore: HypercoreClient, cluster_name: str, rpm: int = 100_000
    ) -> None:
        self.api = api
        self.hypercore = hypercore
        self.cluster_name = cluster_name
        self.failures: list[str] = []
        self.requests = 0
        self.sessions: list[str] = []  # open, oldest first
        self.agent_id = ""
        self.deleted = False
        self._lock = threading.Lock()
        admin = self.client(api.admin_key)
        user = self.call(
            admin,
            "POST",
            "/v1/users",
            201,
            json={"name": "ramp-" + uuid.uuid4().hex[:6], "quotas": {"requests_per_minute": rpm}},
        )
        admin.close()
        assert user is not None, self.failures
        self.key = str(user["api_key"])
        self.http = self.client(self.key)

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.api.base_url,
            timeout=HTTP_TIMEOUT_S,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    def call(
        self, http: httpx.Client, method: str, path: str, expect: int = 200, **kwargs: Any
    ) -> Any:
        """The answer's JSON, or None (and a line in ``failures``) when it was not ``expect``."""
        try:
            response = http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            failure = f"{method} {path}: {type(e).__name__}: {e}"
        else:
            if response.status_code == expect:
                with self._lock:
                    self.requests += 1
                return response.json()
            failure = f"{method} {path}: {response.status_code} {response.text[:300]}"
        with self._lock:
            self.requests += 1
            self.failures.append(failure)
        return None

    def create_agent(self, spec: dict[str, Any]) -> str:
        created = self.call(self.http, "POST", "/v1/agents", 201, json=spec)
        assert created is not None, self.failures
        self.agent_id = str(created["id"])
        return self.agent_id

    def open_session(self) -> str | None:
        """Opens a session and sends its first message; its id, or None when either failed."""
        opened = self.call(self.http, "POST", f"/v1/agents/{self.agent_id}/sessions", 201)
        if opened is None:
            return None
        session_id = str(opened["id"])
        self.sessions.append(session_id)
        return session_id if self.send(session_id, "hello") is not None else None

    def send(self, session_id: str, text: str, http: httpx.Client | None = None) -> str | None:
        """The answer's text, or None when the message failed."""
        turn = self.call(
            http or self.http,
            "POST",
            f"/v1/sessions/{session_id}/messages",
            json={"content": text},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        if turn is None:
            return None
        return "".join(b.get("text", "") for b in turn["content"] if b.get("type") == "text")

    def stream(self, session_id: str, text: str, http: httpx.Client | None = None) -> bool:
        """Sends ``text`` as an SSE turn; False (and a line in ``failures``) when the answer was
        not 200, or the stream ended in an ``error`` event or before the turn's end."""
        path = f"/v1/sessions/{session_id}/messages"
        try:
            response = (http or self.http).post(
                path,
                json={"content": text, "stream": True},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
        except httpx.HTTPError as e:
            failure = f"POST {path} (SSE): {type(e).__name__}: {e}"
        else:
            body = response.text
            if response.status_code == 200 and "turn_end" in body and "event: error" not in body:
                with self._lock:
                    self.requests += 1
                return True
            failure = f"POST {path} (SSE): {response.status_code} {body[-300:]}"
        with self._lock:
            self.requests += 1
            self.failures.append(failure)
        return False

    def close_session(self, session_id: str) -> None:
        self.call(self.http, "DELETE", f"/v1/sessions/{session_id}")
        self.sessions.remove(session_id)

    def turns(self, session_id: str) -> int:
        page = self.call(self.http, "GET", f"/v1/sessions/{session_id}/messages")
        return -1 if page is None else len(page["turns"])

    def detail(self, http: httpx.Client | None = None) -> dict[str, Any] | None:
        detail: dict[str, Any] | None = self.call(
            http or self.http, "GET", f"/v1/agents/{self.agent_id}"
        )
        return detail

    def vms(self) -> dict[str, str]:
        """The cluster's worker workloads in Hypercore's List: instance id -> workload id."""
        return cluster_workloads(self.hypercore, self.cluster_name, "worker")

    def sample(self, t: float, http: httpx.Client | None = None) -> Sample | None:
        """The pool now (its VMs only while the agent is not created yet, or once it is
        deleted); None when the API failed."""
        if not self.agent_id or self.deleted:
            return Sample(t, 0, 0, 0, 0, 0, 0, len(self.vms()))
        detail = self.detail(http)
        if detail is None:
            return None
        states = [r["state"] for r in detail["replicas"]]
        return Sample(
            t=t,
            sessions=len(self.sessions),
            hosted=int(detail["sessions"]),
            desired=int(detail["desired_replicas"]),
            ready=states.count("ready"),
            starting=states.count("starting"),
            draining=states.count("draining"),
            vms=len(self.vms()),
        )

    def delete_agent(self) -> None:
        self.deleted = True
        self.call(self.http, "DELETE", f"/v1/agents/{self.agent_id}")

    def close(self) -> None:
        self.http.close()


class Talker:
    """Sends a message to each of ``sessions`` in turn, round after round, JSON and SSE turns in
    alternation, on its own thread and HTTP client, until the ``with`` block ends; ``answered``
    counts the messages that got a whole answer."""

    def __init__(self, load: PoolLoad, sessions: list[str]) -> None:
        self.load = load
        self.sessions = list(sessions)
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Talker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(HTTP_TIMEOUT_S + 10)

    def _run(self) -> None:
        streamed = False
        with self.load.client() as http:
            while not self._stop.is_set():
                for session_id in self.sessions:
                    streamed = not streamed
                    if streamed:
                        answered = self.load.stream(session_id, "still there?", http)
                    else:
                        answered = self.load.send(session_id, "still there?", http) is not None
                    self.answered += answered
                time.sleep(TALK_PAUSE_S)
