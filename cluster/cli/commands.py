"""The ``hyperfleet`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.observability import ports as observability_ports
from hyperfleet import ports

from .loadtest_command import loadtest_parser, run_loadtest

if TYPE_CHECKING:
    from pydantic import ValidationError

# Each command imports what it runs when it runs: `hyperfleet node` is a VM's entrypoint, and
# neither it nor `--help` should pay for pydantic, the API client, or a stand-in.


def _print_errors(prog: str, e: ValidationError, names: dict[str, str] | None = None) -> None:
    """A pydantic error as one line per field, named as the user wrote it (a flag or an env)."""
    for error in e.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if names is None:
            where = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
        else:
            where = names.get(field, field)
        print(f"{prog}: {where}: {error['msg']}", file=sys.stderr)


def _emulator_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulator",
        help="serve the local Anthropic Messages API emulator",
        description=(
            "Serve an emulator of the Anthropic Messages API (JSON and SSE streaming, tool use, "
            "count_tokens, models, prompt-cache usage) with a latency model and fault injection. "
            "Fault fractions are of all requests; per-request headers x-emulator-* override "
            "every setting (see docs/emulator.md)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=ports.EMULATOR_PORT)
    p.add_argument(
        "--api-key",
        default=os.environ.get("HYPERFLEET_EMULATOR_API_KEY"),
        help="accept only this x-api-key (default: $HYPERFLEET_EMULATOR_API_KEY, else any key)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    p.add_argument("--tps", type=float, default=0.0, help="output tokens per second (0: no limit)")
    p.add_argument("--jitter", type=float, default=0.0, help="seeded +/- fraction on ttft and tps")
    p.add_argument("--delta-interval-ms", type=float, default=20.0, help="SSE delta coalescing")
    for code in ("429", "529", "500"):
        p.add_argument(f"--fault-{code}", type=float, default=0.0, help=f"fraction answered {code}")
    p.add_argument(
        "--fault-midstream",
        type=float,
        default=0.0,
        help="fraction of streams that send an error event mid-stream",
    )
    p.add_argument(
        "--fault-drop",
        type=float,
        default=0.0,
        help="fraction of streams whose connection is dropped mid-stream",
    )
    p.add_argument(
        "--fault-after-events",
        type=int,
        default=5,
        help="stream faults strike after this many events",
    )
    p.add_argument("--retry-after-ms", type=int, default=1000, help="wait advertised on 429/529")
    p.add_argument("--cache-min-tokens", type=int, default=1024, help="shortest cacheable prefix")
    p.add_argument("--output-words-min", type=int, default=20)
    p.add_argument("--output-words-max", type=int, default=60)


def _run_emulator(args: argparse.Namespace) -> int:
    # Imported here: uvicorn and the emulator are this command's alone.
    from pydantic import ValidationError

    from cluster.emulator import EmulatorConfig, serve

    try:
        config = EmulatorConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key or None,
            seed=args.seed,
            ttft_ms=args.ttft_ms,
            tps=args.tps,
            jitter=args.jitter,
            delta_interval_ms=args.delta_interval_ms,
            fault_429=args.fault_429,
            fault_529=args.fault_529,
            fault_500=args.fault_500,
            fault_midstream=args.fault_midstream,
            fault_drop=args.fault_drop,
            fault_after_events=args.fault_after_events,
            retry_after_ms=args.retry_after_ms,
            cache_min_tokens=args.cache_min_tokens,
            output_words_min=args.output_words_min,
            output_words_max=args.output_words_max,
        )
    except ValidationError as e:
        _print_errors("hyperfleet emulator", e)
        return 2
    print(f"Anthropic emulator on http://{config.host}:{config.port}", flush=True)
    serve(config)
    return 0


def _admission_flags(args: argparse.Namespace) -> dict[str, object]:
    """The ingress's settings from ``up``'s flags (``IngressConfig``'s keys): the per-address
    limit and the agent pools' fleet-wide settings.

    Raises:
        ValueError: a CIDR list has an item that is not a CIDR, or the limit is below 1.
    """
    from serve_app.client_address import parse_networks, split_cidrs

    if args.ip_requests_per_minute < 1:
        raise ValueError("--ip-requests-per-minute: must be at least 1")
    exempt = split_cidrs(args.ip_exempt)
    trusted = split_cidrs(args.trusted_proxies)
    parse_networks(exempt, "--ip-exempt")
    parse_networks(trusted, "--trusted-proxies")
    if args.fleet_max_replicas < 1 or args.warm_replicas < 0:
        raise ValueError("--fleet-max-replicas: at least 1; --warm-replicas: at least 0")
    return {
        "ip_requests_per_minute": args.ip_requests_per_minute,
        "ip_exempt": exempt,
        "trusted_proxies": trusted,
        "forwarded_header": args.forwarded_header,
        "pool": {"fleet_max_replicas": args.fleet_max_replicas, "warm_floor": args.warm_replicas},
    }


def _emulator_flags(args: argparse.Namespace) -> list[str]:
    """``hyperfleet emulator``'s latency flags from ``up``'s ``--emulator-*`` ones.

    Raises:
        ValueError: a value out of the emulator's range.
    """
    if args.emulator_ttft_ms < 0 or args.emulator_tps < 0 or not 0 <= args.emulator_jitter <= 1:
        raise ValueError(
            "--emulator-ttft-ms and --emulator-tps: at least 0; --emulator-jitter: 0 to 1"
        )
    return [
        f"--ttft-ms={args.emulator_ttft_ms:g}",
        f"--tps={args.emulator_tps:g}",
        f"--jitter={args.emulator_jitter:g}",
    ]


def _run_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from . import stack
    from .settings import Settings

    try:
        settings = Settings.from_env()
    except ValidationError as e:
        _print_errors("hyperfleet up", e, {"redis_url": "HYPERFLEET_REDIS_URL"})
        return 2
    try:
        admission = _admission_flags(args)
        emulator_flags = _emulator_flags(args)
    except ValueError as e:
        print(f"hyperfleet up: {e}", file=sys.stderr)
        return 2
    try:
        info = stack.up(
            settings,
            args.port,
            args.emulator_port,
            args.ray_port,
            redis_port=args.redis_port,
            admission=admission,
            dashboard_port=args.dashboard_port,
            prometheus_port=args.prometheus_port,
            grafana_port=args.grafana_port,
            emulator_flags=emulator_flags,
            **({"prometheus_rules": args.prometheus_rules} if args.prometheus_rules else {}),
        )
    except stack.StackError as e:
        print(f"hyperfleet up: {e}", file=sys.stderr)
        return 1
    print()
    print(f"Hyperfleet API: {info.api_url}")
    print(f"Admin API key:  {info.admin_key}")
    print(f"  (saved in {info.admin_key_file})")
    if info.emulator_url:
        print(f"Anthropic emulator: {info.emulator_url} (no ANTHROPIC_API_KEY set)")
    print(f"Ray dashboard:  {info.dashboard_url}")
    print(f"  (it asks once for the Ray token: the text of {info.ray_token_file})")
    if info.prometheus_url:
        print(f"Prometheus:     {info.prometheus_url}")
    print(f"Grafana provisioning: {info.grafana_folder} (to run a Grafana with it: README.md)")
    print("Next: hyperfleet agents create --tool bash, then hyperfleet chat <agent-id>.")
    print(f"Logs: {settings.logs_dir}. Stop with: hyperfleet down")
    return 0


def _run_down(args: argparse.Namespace) -> int:
    from . import stack
    from .settings import Settings

    stack.down(Settings.from_env())
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from . import stack
    from .settings import Settings

    print(json.dumps(stack.status(Settings.from_env()), indent=2))
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from . import client
    from .settings import Settings

    try:
        return client.chat(
            client.ApiClient.from_env(Settings.from_env()), args.agent_id, sys.stdin, sys.stdout
        )
    except client.ClientError as e:
        print(f"hyperfleet chat: {e}", file=sys.stderr)
        return 1


def _run_agents(args: argparse.Namespace) -> int:
    from . import client
    from .settings import Settings

    try:
        api = client.ApiClient.from_env(Settings.from_env())
        if args.action == "create":
            spec: dict[str, object] = {"model": args.model, "tools": args.tool or []}
            if args.system:
                spec["system"] = args.system
            client.print_json(api.call("POST", "/v1/agents", spec))
        elif args.action == "list":
            for agent in api.call("GET", "/v1/agents")["data"]:
                tools = ",".join(agent["tools"]) or "-"
                print(f"{agent['id']}  {agent['status']:8}  {agent['model']}  tools={tools}")
        else:
            client.print_json(api.call("DELETE", f"/v1/agents/{args.agent_id}"))
    except client.ClientError as e:
        print(f"hyperfleet agents: {e}", file=sys.stderr)
        return 1
    return 0


def _run_node(args: argparse.Namespace) -> int:
    # Imported here: the other commands need none of the node agent.
    from cluster.node import agent

    return agent.main()


def _hypercore_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "hypercore",
        help="run the local Hypercore stand-in",
        description="Hypercore tools. `serve` runs the local stand-in for a Hypercore host.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve_p = actions.add_parser(
        "serve",
        help="serve Hypercore's cluster API with local processes as workloads",
        description=(
            "Serve Hypercore's ClusterService (gRPC) and its HTTP mirror with Hypercore's "
            "semantics and error texts. Each workload is a local process tree running what its "
            "image maps to in the image catalog, on its own 127.88.x.y address. SIGTERM stops "
            "every workload. Defaults avoid Hypercore's 8000/8001: 8000 is Hyperfleet's API port."
        ),
    )
    serve_p.add_argument("--grpc-bind-addr", default=ports.HYPERCORE_STANDIN_GRPC_BIND_ADDR)
    serve_p.add_argument("--http-bind-addr", default=ports.HYPERCORE_STANDIN_HTTP_BIND_ADDR)
    serve_p.add_argument(
        "--image-catalog", type=Path, help="JSON or YAML image_ref -> argv/env (default: built in)"
    )
    serve_p.add_argument(
        "--refresh-interval-s", type=float, default=5.0, help="how often List's cache is rebuilt"
    )
    serve_p.add_argument("--cluster-base-url", default="example.com", help="workload url suffix")
    serve_p.add_argument(
        "--state-dir",
        type=Path,
        help="workload logs and homes (default: $HYPERFLEET_HOME/hypercore)",
    )


def _run_hypercore(args: argparse.Namespace) -> int:
    # Imported here: grpc and the stand-in are needed by this command only.
    from pydantic import ValidationError

    from cluster.hypercore_standin import CatalogError, ImageCatalog, StandinConfig
    from cluster.hypercore_standin import serve as serve_standin

    from .settings import Settings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        catalog = (
            ImageCatalog.load(args.image_catalog) if args.image_catalog else ImageCatalog.default()
        )
        config = StandinConfig(
            grpc_bind_addr=args.grpc_bind_addr,
            http_bind_addr=args.http_bind_addr,
            catalog=catalog,
            state_dir=args.state_dir or Settings.from_env().home / "hypercore",
            refresh_interval_s=args.refresh_interval_s,
            base_url=args.cluster_base_url,
        )
    except CatalogError as e:
        print(f"hyperfleet hypercore serve: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        _print_errors("hyperfleet hypercore serve", e)
        return 2
    return serve_standin(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperfleet",
        description="Hyperfleet: run Claude agents at scale on Ray and Hypercore microVMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _emulator_parser(sub)
    p = sub.add_parser(
        "up",
        help="start the local stack on this machine",
        description=(
            "Start, in the background: a Ray head with its dashboard, the stores (Redis when "
            "redis-server is installed or HYPERFLEET_REDIS_URL is set), the Serve HTTP API, "
            "the Anthropic emulator when ANTHROPIC_API_KEY is not set, and Prometheus when "
            "installed; write a Grafana provisioning folder. State in $HYPERFLEET_HOME."
        ),
    )
    p.add_argument("--port", type=int, default=ports.API_PORT, help="HTTP API port")
    p.add_argument("--emulator-port", type=int, default=ports.EMULATOR_PORT)
    p.add_argument("--ray-port", type=int, default=ports.RAY_GCS_PORT, help="Ray GCS port")
    p.add_argument(
        "--redis-port",
        type=int,
        default=ports.REDIS_PORT,
        help="the local redis-server's port (started when installed; HYPERFLEET_REDIS=off: not)",
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=observability_ports.DASHBOARD_PORT,
        help="the Ray dashboard's port",
    )
    p.add_argument(
        "--prometheus-port",
        type=int,
        default=observability_ports.PROMETHEUS_PORT,
        help="the stack's Prometheus's port (started when installed)",
    )
    p.add_argument(
        "--grafana-port",
        type=int,
        default=observability_ports.GRAFANA_PORT,
        help="where the Ray dashboard and the written grafana.ini expect a Grafana (up runs none)",
    )
    p.add_argument(
        "--prometheus-rules",
        action="append",
        type=Path,
        metavar="FILE",
        help="a Prometheus rule file to load (repeatable; default: "
        "cluster/observability/alerts.yml when it exists)",
    )
    p.add_argument(
        "--ip-requests-per-minute",
        type=int,
        default=100,
        help="requests a minute from one client address (an IPv6 client: one /64)",
    )
    p.add_argument(
        "--ip-exempt",
        default="",
        metavar="CIDR[,CIDR...]",
        help="client addresses the per-address limit skips (keys and user limits still apply)",
    )
    p.add_argument(
        "--trusted-proxies",
        default="",
        metavar="CIDR[,CIDR...]",
        help="proxies in front of the API whose forwarding header names the client (default: "
        "none; see docs/security.md)",
    )
    p.add_argument(
        "--forwarded-header",
        choices=("x-forwarded-for", "forwarded"),
        default="x-forwarded-for",
        help="the header --trusted-proxies set: X-Forwarded-For or RFC 7239 Forwarded",
    )
    p.add_argument(
        "--emulator-ttft-ms",
        type=float,
        default=0.0,
        help="the emulator's time to first token, for turns that take as long as real ones "
        "(an emulator already running keeps its own; hyperfleet down first)",
    )
    p.add_argument(
        "--emulator-tps",
        type=float,
        default=0.0,
        help="the emulator's output tokens per second (0: no limit)",
    )
    p.add_argument(
        "--emulator-jitter",
        type=float,
        default=0.0,
        help="a seeded +/- fraction on the emulator's ttft and tps (0 to 1)",
    )
    p.add_argument(
        "--fleet-max-replicas",
        type=int,
        default=1_000,
        help="agent replicas of all agents together, at most (the pool controller's cap)",
    )
    p.add_argument(
        "--warm-replicas",
        type=int,
        default=0,
        help="replica slots of capacity kept in the cluster, in use or not (Ray's "
        "request_resources; default 0: one machine has no autoscaler to add any)",
    )
    sub.add_parser("down", help="stop the local stack", description="Stop what `up` started.")
    sub.add_parser(
        "status",
        help="show the local stack",
        description=(
            "Show what runs, where it logs, and where the API, the Ray dashboard, Prometheus "
            "and the Grafana provisioning folder are."
        ),
    )
    p = sub.add_parser(
        "chat",
        help="stream a conversation with an agent",
        description="Open a session with an agent and chat, streaming its replies and tool calls.",
    )
    p.add_argument("agent_id")
    p = sub.add_parser("agents", help="create, list or delete agents", description="Manage agents.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create an agent", description="Create an agent.")
    create.add_argument("--model", default="claude-sonnet-5-5")
    create.add_argument("--system", default="", help="system prompt")
    create.add_argument("--tool", action="append", help="bash, read_file, ... (repeatable)")
    actions.add_parser("list", help="list your agents", description="List your agents.")
    delete = actions.add_parser("delete", help="drain and delete", description="Delete an agent.")
    delete.add_argument("agent_id")
    sub.add_parser(
        "node",
        help="run this machine's Ray node (the VM image's entrypoint)",
        description=(
            "Run a Ray head or worker node configured by HYPERFLEET_* env (see "
            "docs/node-agent.md): GPUs from NVML, the Ray token (the head makes it; a worker "
            "redeems its join ticket), then `ray start --block`. SIGTERM drains the node before "
            "exiting."
        ),
    )
    _hypercore_parser(sub)
    loadtest_parser(sub)
    return parser


_HANDLERS = {
    "emulator": _run_emulator,
    "up": _run_up,
    "down": _run_down,
    "status": _run_status,
    "chat": _run_chat,
    "agents": _run_agents,
    "node": _run_node,
    "hypercore": _run_hypercore,
    "loadtest": run_loadtest,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
