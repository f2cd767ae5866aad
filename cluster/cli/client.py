"""The terminal client: ``hyperfleet chat`` and ``hyperfleet agents``, over the HTTP API.

The API key comes from ``HYPERFLEET_API_KEY`` or ``$HYPERFLEET_HOME/admin.key``; the URL from
``HYPERFLEET_URL`` or what ``hyperfleet up`` recorded.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

from .settings import Settings

TIMEOUT_S = 900.0


class ClientError(Exception):
    """The API refused a call; the message is its error."""


class ApiClient:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    @classmethod
    def from_env(cls, settings: Settings) -> ApiClient:
        key = os.environ.get("HYPERFLEET_API_KEY")
        if not key:
            try:
                key = (settings.home / "admin.key").read_text().strip()
            except OSError:
                raise ClientError(
                    "no API key: set HYPERFLEET_API_KEY or run `hyperfleet up`"
                ) from None
        url = os.environ.get("HYPERFLEET_URL")
        if not url:
            try:
                url = json.loads((settings.home / "stack.json").read_text())["api_url"]
            except (OSError, ValueError, KeyError):
                url = "http://127.0.0.1:8000"
        return cls(str(url), key)

    def _open(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own
            self.base_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.api_key}", "content-type": "application/json"},
        )
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())["error"]
                message = f"{e.code} {error['type']}: {error['message']}"
            except (ValueError, KeyError):
                message = f"{e.code} {e.reason}"
            raise ClientError(message) from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach {self.base_url}: {e.reason}") from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def stream(self, session_id: str, content: str) -> Iterator[tuple[str, dict[str, Any]]]:
        body = {"content": content, "stream": True}
        with self._open("POST", f"/v1/sessions/{session_id}/messages", body) as response:
            kind = ""
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield kind, json.loads(line[6:])


def chat(client: ApiClient, agent_id: str, stdin: TextIO, stdout: TextIO) -> int:
    """A streaming conversation: one session, a line per message, until EOF or /quit."""
    session = client.call("POST", f"/v1/agents/{agent_id}/sessions")
    stdout.write(f"session {session['id']} with agent {agent_id}; /quit to leave\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            stdout.write("\n")
            return 0
        if not line.strip():
            continue
        stdout.write("agent> ")
        for kind, data in client.stream(session["id"], line.rstrip("\n")):
            if kind == "text_delta":
                stdout.write(data["text"])
            elif kind == "tool_use":
                stdout.write(f"\n  [tool {data['name']} {json.dumps(data['input'])}]\n")
            elif kind == "tool_result":
                mark = "error" if data["is_error"] else "result"
                stdout.write(f"  [{mark}] {data['content'][:500]}\n")
            elif kind == "turn_end":
                usage = data["usage"]
                stdout.write(
                    f"\n  ({data['stop_reason']}; {usage['input_tokens']} in, "
                    f"{usage['output_tokens']} out, ${data['cost_usd']:.6f})\n"
                )
            elif kind == "error":
                stdout.write(f"\n  error: {data.get('message')}\n")
            stdout.flush()


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
