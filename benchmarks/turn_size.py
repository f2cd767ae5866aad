"""How many bytes a committed turn takes in the session store, and how much of it is its events
(kept since issue 18 so that any replica can replay a finished turn's stream).

A real ``SessionHost`` on SQLite runs a text turn and a tool turn against the emulator (50 tokens
a second, so text is coalesced as it would be from the real API) and prints each stored body's
size and its events' share. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

from actors import AgentSpec, RuntimeConfig, SqliteSessionStore
from actors.actor import build_host, model_client
from cluster.cli.servers import start_emulator
from hyperfleet.processes import free_port, stop

MESSAGES = ("Tell me about the sea", '[[tool bash {"command": "seq 1 50"}]]')


async def run_turns(base_url: str, key: str, root: Path) -> None:
    store = SqliteSessionStore(root / "sessions.db")
    client = model_client(key, base_url, transport="aiohttp", max_retries=2)
    runtime = RuntimeConfig(workspaces=str(root / "workspaces"))
    host = build_host("size", AgentSpec(tools=("bash",)), runtime, client, store=store)
    session_id = (await host.open_session("bench"))["id"]
    for message in MESSAGES:
        async for _ in host.stream(session_id, message):
            pass
    await client.close()
    store.close()


def sizes(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        bodies = [row[0] for row in db.execute("SELECT body FROM turns ORDER BY idx")]
    lines = []
    for body in bodies:
        turn = json.loads(body)
        events = len(json.dumps(turn["events"], separators=(",", ":")))
        lines.append(
            f"turn {turn['index']} ({turn['stop_reason']}): {len(turn['events'])} events, "
            f"body {len(body):,} B, of which events {events:,} B ({events / len(body):.0%})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tps", type=int, default=50, help="the emulator's tokens a second")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hyperfleet-turn-size-"))
    root.chmod(0o711)  # the sandbox's user reaches the workspaces
    port, key = free_port(), "sk-ant-turn-size"
    emulator = start_emulator(port, key, root / "emulator.log", "--tps", str(args.tps))
    try:
        asyncio.run(run_turns(f"http://127.0.0.1:{port}", key, root))
        for line in sizes(root / "sessions.db"):
            print(line)
    finally:
        stop(emulator)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
