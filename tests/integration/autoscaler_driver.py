"""A Ray driver for a second cluster, run as a subprocess by the autoscaler tests.

The pytest process is a driver of the session's Ray cluster and Ray allows one cluster per
process, so a test that brings up its own autoscaling cluster talks to it through this script:
one JSON request per line on stdin, one JSON reply per line on stdout, after ``REPLY_MARKER``
(``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``; Ray prints its own lines to
stdout too). Every Ray call has a timeout.

    python -m tests.integration.autoscaler_driver GCS_ADDRESS
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors import NAMESPACE, AgentSpec, RuntimeConfig, spawn_replica, start_store_actor
from hyperfleet.names import CONTROL_ACTOR_NAME, POOL_ACTOR_NAME

CALL_TIMEOUT_S = 60.0
RETRY_PAUSE_S = 1.0
INSTANCE_LABEL = "hyperfleet/instance-id"
REPLY_MARKER = "@@driver-reply "


def _node_of(node_id: str) -> dict[str, Any]:
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            labels = node.get("Labels") or {}
            return {
                "node_id": node_id,
                "alive": node["Alive"],
                "instance_id": labels.get(INSTANCE_LABEL),
                "address": node["NodeManagerAddress"],
                "resources": node.get("Resources", {}),
            }
    return {"node_id": node_id, "alive": False, "instance_id": None}


def _replica(agent_id: str) -> Any:
    return ray.get_actor(f"agent-{agent_id}-0", namespace=NAMESPACE)


def _retrying(deadline_s: float, call: Callable[[], Any]) -> Any:
    """Retries ``call`` until it succeeds or ``deadline_s`` passes (a replica being restarted
    on another node fails calls for a while)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_PAUSE_S)


def setup_store(path: str) -> str:
    store = start_store_actor(path)  # type: ignore[arg-type]
    ray.get(store.ping.remote(), timeout=CALL_TIMEOUT_S)
    return "ok"


def spawn(agent_id: str, spec: dict[str, Any], runtime: dict[str, Any], ready_s: float) -> Any:
    handle = spawn_replica(
        agent_id, 0, AgentSpec.model_validate(spec), RuntimeConfig.model_validate(runtime)
    )
    ray.get(handle.health.remote(), timeout=ready_s)
    return where(agent_id, CALL_TIMEOUT_S)


def where(agent_id: str, deadline_s: float) -> dict[str, Any]:
    stats = _retrying(
        deadline_s, lambda: ray.get(_replica(agent_id).stats.remote(), timeout=CALL_TIMEOUT_S)
    )
    return {**_node_of(stats["node_id"]), "replica_resources": stats["resources"]}


def wait_moved(agent_id: str, from_node_id: str, deadline_s: float) -> dict[str, Any]:
    """Waits until the replica runs on another node than ``from_node_id`` (Ray restarts it
    there once its node has drained and stopped)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            stats = ray.get(_replica(agent_id).stats.remote(), timeout=RETRY_PAUSE_S * 5)
            if stats["node_id"] != from_node_id:
                return where(agent_id, deadline_s)
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replica is still on node {from_node_id}")
        time.sleep(RETRY_PAUSE_S)


def open_session(agent_id: str) -> str:
    session = ray.get(_replica(agent_id).open_session.remote("alice"), timeout=CALL_TIMEOUT_S)
    return str(session["id"])


def send(agent_id: str, session_id: str, text: str, deadline_s: float) -> str:
    def once() -> str:
        turn = ray.get(
            _replica(agent_id).send.remote(session_id, text, f"key-{text}", "alice"),
            timeout=CALL_TIMEOUT_S,
        )
        return "".join(block.get("text", "") for block in turn["content"])

    return str(_retrying(deadline_s, once))


def transcript(agent_id: str, session_id: str) -> list[str]:
    result = ray.get(
        _replica(agent_id).transcript.remote(session_id, "alice"), timeout=CALL_TIMEOUT_S
    )
    return [
        m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
        for turn in result["turns"]
        for m in turn["messages"]
        if m["role"] == "user"
    ]


def provider_address(node_id: str, gcs_address: str) -> str | None:
    """The node's address as the provider in the head's autoscaler reads it: from this
    cluster's GCS, by instance id."""
    from autoscaling import RayNodeTable

    return RayNodeTable(gcs_address).address_of(node_id)


def delete(agent_id: str) -> str:
    ray.kill(_replica(agent_id), no_restart=True)
    return "ok"


def nodes() -> list[dict[str, Any]]:
    return [_node_of(n["NodeID"]) for n in ray.nodes() if n["Alive"]]


def serve_api(port: int, control_path: str, config: dict[str, Any]) -> dict[str, str]:
    """The HTTP API on this cluster, as the integration tier's ``api_server`` runs it: the
    control store on the head with an administrator's key, and the Serve app (its ingress starts
    the pool controller). The proxy runs on the head only: every local "VM" shares this
    machine's loopback, where a proxy per node would contend for the port."""
    from ray import serve

    from serve_app import APP_NAME, build, start_control_actor

    control = start_control_actor(Path(control_path))
    ray.get(control.ping.remote(), timeout=CALL_TIMEOUT_S)
    ray.get(control.create_user.remote("usr_admin", "admin", {}, True), timeout=CALL_TIMEOUT_S)
    issued = ray.get(control.issue_key.remote("usr_admin"), timeout=CALL_TIMEOUT_S)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(config, num_replicas=1), name=APP_NAME, route_prefix="/")
    return {"base_url": f"http://127.0.0.1:{port}", "admin_key": issued.api_key}


def serve_down() -> str:
    """Stops what ``serve_api`` started: Serve, the pool controller and the control store."""
    from ray import serve

    serve.shutdown()  # type: ignore[no-untyped-call]
    for name in (POOL_ACTOR_NAME, CONTROL_ACTOR_NAME):
        with contextlib.suppress(ValueError):  # never started, or gone
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    return "ok"


def session_replica(session_id: str) -> int | None:
    """The replica index the control store routes ``session_id`` to (None: no route)."""
    control = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
    route: Any = ray.get(control.get_route.remote(session_id), timeout=CALL_TIMEOUT_S)
    return None if route is None else int(route.replica)


OPS: dict[str, Callable[..., Any]] = {
    "setup_store": setup_store,
    "spawn": spawn,
    "where": where,
    "wait_moved": wait_moved,
    "open_session": open_session,
    "send": send,
    "transcript": transcript,
    "delete": delete,
    "provider_address": provider_address,
    "nodes": nodes,
    "serve_api": serve_api,
    "serve_down": serve_down,
    "session_replica": session_replica,
}


def main() -> int:
    ray.init(address=sys.argv[1], namespace=NAMESPACE, log_to_driver=False)
    print(REPLY_MARKER + json.dumps({"ok": True, "result": "connected"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = OPS[request.pop("op")](**request)
            reply = {"ok": True, "result": result}
        except Exception as e:  # noqa: BLE001 - every failure goes back to the test, verbatim
            reply = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
        print(REPLY_MARKER + json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
