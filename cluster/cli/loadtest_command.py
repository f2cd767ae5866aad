"""``hyperfleet loadtest``: its flags, and the run (the engine is ``cluster.loadtest``, imported
when the command runs: aiohttp is this command's alone)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from hyperfleet import ports


def loadtest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "loadtest",
        help="apply load to the HTTP API and judge it against thresholds",
        description=(
            "Virtual users open sessions and send messages with idempotency keys, retrying as a "
            "good client does, against a user, key and agent the test makes (with an admin key) "
            "and removes afterwards. Prints latency (end to end and time to first event), "
            "throughput, errors, tokens and the tester's own load; exits 0 when every threshold "
            "holds, 1 when one fails (each failed criterion printed), 2 when it cannot start. "
            "The --json layout: docs/loadtest.md."
        ),
    )
    p.add_argument(
        "--api-url",
        help="the API (default: $HYPERFLEET_URL, else what `hyperfleet up` recorded)",
    )
    p.add_argument(
        "--api-key",
        help="the tester's key (default: $HYPERFLEET_API_KEY, else $HYPERFLEET_HOME/admin.key); "
        "an admin key makes a test user with raised quotas, another key is used as it is",
    )
    p.add_argument(
        "--anthropic-key",
        help="the Anthropic key the test's agent uses (default: the platform's)",
    )
    p.add_argument(
        "--users",
        type=int,
        default=10,
        help="virtual users (closed loop), or sessions to arrive (with --rate)",
    )
    p.add_argument("--requests", type=int, default=10, help="messages per session")
    p.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        metavar="S",
        help="mean pause between a user's messages, exponentially distributed (default 0)",
    )
    p.add_argument(
        "--ramp-up",
        type=float,
        default=0.0,
        metavar="S",
        help="start users evenly over S "
        "seconds (with --rate: the arrival rate grows linearly to R over S)",
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="run for S seconds: users start new "
        "sessions of --requests messages until then (with --rate: arrivals stop then)",
    )
    p.add_argument(
        "--stream", action="store_true", help="send with SSE and measure time to first event"
    )
    p.add_argument(
        "--tools-mix",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of messages that make a tool call (write_file), 0 to 1",
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="open loop: sessions arrive as a Poisson process, R a second (default: closed loop)",
    )
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per attempt")
    p.add_argument("--max-retries", type=int, default=5, help="per request")
    p.add_argument("--seed", type=int, default=0, help="seed of think times, arrivals, tools")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the result here")
    p.add_argument("--p95-max", type=float, default=3.0, metavar="S", help="end to end")
    p.add_argument("--p99-max", type=float, default=10.0, metavar="S", help="end to end")
    p.add_argument("--success-min", type=float, default=0.99, metavar="SHARE")
    p.add_argument("--rps-min", type=float, metavar="R", help="completed messages a second")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="load generators: 1 runs in this process; N splits the users (and --rate) over N "
        "Ray actors spread over the cluster's nodes, and merges what they measured",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster for --workers above 1 (default: $RAY_ADDRESS, else the head "
        "`hyperfleet up` recorded, else Ray's `auto`)",
    )


def _loadtest_target(args: argparse.Namespace) -> tuple[str, str]:
    """The API's URL and the tester's key, found as ``hyperfleet chat`` finds them.

    Raises:
        ValueError: no key anywhere.
    """
    from .settings import Settings

    home = Settings.from_env().home
    key = args.api_key or os.environ.get("HYPERFLEET_API_KEY")
    if not key:
        try:
            key = (home / "admin.key").read_text().strip()
        except OSError:
            raise ValueError(
                "no API key: give --api-key, set HYPERFLEET_API_KEY, or run `hyperfleet up` "
                f"(which writes {home / 'admin.key'})"
            ) from None
    url = args.api_url or os.environ.get("HYPERFLEET_URL")
    if not url:
        try:
            url = str(json.loads((home / "stack.json").read_text())["api_url"])
        except (OSError, ValueError, KeyError):
            url = f"http://127.0.0.1:{ports.API_PORT}"
    return url, key


def _ray_address(args: argparse.Namespace) -> str | None:
    """The Ray cluster to join for ``--workers`` above 1, and what joining it takes in this
    process's environment (read once, when ``ray`` is imported): the token of the stack
    ``hyperfleet up`` started, and loopback alone for a head on 127.0.0.1."""
    from .servers import LOOPBACK_RAY_ENV
    from .settings import Settings
    from .stack import ray_token_file

    settings = Settings.from_env()
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        try:
            address = str(json.loads((settings.home / "stack.json").read_text())["ray_address"])
        except (OSError, ValueError, KeyError):
            address = None  # Ray's `auto`: the latest head started on this machine
    token = ray_token_file(settings)
    own_token = "RAY_AUTH_TOKEN_PATH" in os.environ or "RAY_AUTH_TOKEN" in os.environ
    if not own_token and token.exists():
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        os.environ.update(LOOPBACK_RAY_ENV)
    return address


def run_loadtest(args: argparse.Namespace) -> int:
    # Imported here: aiohttp and the engine are this command's alone.
    from cluster import loadtest

    try:
        url, key = _loadtest_target(args)
        plan = loadtest.Plan(
            users=args.users,
            requests=args.requests,
            think_time_s=args.think_time,
            ramp_up_s=args.ramp_up,
            duration_s=args.duration,
            stream=args.stream,
            tools_mix=args.tools_mix,
            rate=args.rate,
            timeout_s=args.timeout,
            max_retries=args.max_retries,
            seed=args.seed,
        )
        if not 0 <= args.success_min <= 1:
            raise ValueError("--success-min: a share, 0 to 1")
        thresholds = loadtest.Thresholds(
            p95_max_s=args.p95_max,
            p99_max_s=args.p99_max,
            success_min=args.success_min,
            rps_min=args.rps_min,
        )
        config = loadtest.LoadTestConfig(
            url,
            key,
            plan,
            thresholds,
            anthropic_key=args.anthropic_key,
            progress=not args.quiet,
            workers=args.workers,
        )
    except ValueError as e:
        print(f"hyperfleet loadtest: {e}", file=sys.stderr)
        return 2
    if config.workers > 1:
        config = dataclasses.replace(config, ray_address=_ray_address(args))
    try:
        report = loadtest.run(config)
    except loadtest.SetupError as e:
        print(f"hyperfleet loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hyperfleet loadtest: interrupted", file=sys.stderr)
        return 130
    print(loadtest.summary(report))
    if args.json is not None:
        args.json.write_text(report.model_dump_json(indent=2) + "\n")
        print(f"results: {args.json}")
    return 0 if report.passed else 1
