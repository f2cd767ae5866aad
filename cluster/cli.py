"""The ``hyperfleet`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from . import stack
from .emulator import EmulatorConfig, serve
from .settings import Settings


def _emulator_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulator",
        help="serve the local Anthropic Messages API emulator",
        description=(
            "Serve an emulator of the Anthropic Messages API (JSON and SSE streaming, tool use, "
            "count_tokens, models, prompt-cache usage) with a latency model and fault injection. "
            "Fault fractions are of all requests; per-request headers x-emulator-* override "
            "every setting (see the README)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=stack.DEFAULT_EMULATOR_PORT)
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
        for error in e.errors(include_url=False):
            where = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
            print(f"hyperfleet emulator: {where}: {error['msg']}", file=sys.stderr)
        return 2
    print(f"Anthropic emulator on http://{config.host}:{config.port}", flush=True)
    serve(config)
    return 0


def _run_up(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        info = stack.up(settings, args.emulator_port)
    except stack.StackError as e:
        print(f"hyperfleet up: {e}", file=sys.stderr)
        return 1
    print()
    if info.emulator_url is not None:
        pid = info.emulator.pid if info.emulator else "?"
        key_file = info.emulator_key_file
        print(f"Anthropic emulator: {info.emulator_url} (pid {pid})")
        print(f"  its API key is in {key_file}; try:")
        print(
            f"  curl -s {info.emulator_url}/v1/messages "
            f'-H "x-api-key: $(cat {key_file})" '
            "-H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' "
            '-d \'{"model":"claude-sonnet-5-5","max_tokens":64,'
            '"messages":[{"role":"user","content":"Hello"}]}\''
        )
    print("Not there yet: " + "; ".join(info.not_yet) + ".")
    print(f"Logs: {settings.logs_dir}. Stop with: hyperfleet down")
    return 0


def _run_down(args: argparse.Namespace) -> int:
    stack.down(Settings.from_env())
    return 0


def _run_status(args: argparse.Namespace) -> int:
    info = stack.status(Settings.from_env())
    print(stack.format_status(info))
    return 0


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
        description="Start the local stack in the background (state in $HYPERFLEET_HOME).",
    )
    p.add_argument("--emulator-port", type=int, default=stack.DEFAULT_EMULATOR_PORT)
    sub.add_parser("down", help="stop the local stack", description="Stop what `up` started.")
    sub.add_parser(
        "status", help="show the local stack", description="Show what runs and where it logs."
    )
    return parser


_HANDLERS = {"emulator": _run_emulator, "up": _run_up, "down": _run_down, "status": _run_status}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
