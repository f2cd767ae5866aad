"""The two ways to reach Hypercore's ``ClusterService``: gRPC, and its JSON mirror over HTTP.

Both carry the same protobuf messages (``proto``) and raise the same typed errors (``errors``), so
``HypercoreClient`` does not know which one it holds.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import urllib.parse
from typing import Any, Protocol

import grpc

from . import gojson, proto
from .errors import HypercoreError, HypercoreUnavailable, error_from_text

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_IDLE_CONNECTIONS = 8
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
]


class Transport(Protocol):
    """Calls one ``ClusterService`` rpc and returns its response message.

    Contract: ``call`` is thread-safe; it returns within about ``timeout_s`` or raises
    ``HypercoreUnavailable``; a refusal by Hypercore raises the ``HypercoreError`` its text maps
    to. Nothing is retried: Spawn is not idempotent (a retry could start a second workload), so
    retrying is the caller's decision. ``close`` releases connections; calls after it fail.
    """

    def call(self, method: str, request: Any, timeout_s: float) -> Any: ...

    def close(self) -> None: ...


def _unwrap_logs(text: str) -> str:
    """Hypercore's gRPC Logs fetches the host's HTTP ``/logs`` and returns that response body
    verbatim (``{"response": "..."}`` or ``{"error": "..."}``); this returns the logs inside."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        raise error_from_text(body["error"])
    if isinstance(body, dict) and isinstance(body.get("response"), str):
        response: str = body["response"]
        return response
    return text


class GrpcTransport:
    """One plaintext gRPC channel (thread-safe, multiplexed) to ``host:port``."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address, options=_GRPC_OPTIONS)
        self._calls = {
            name: self._channel.unary_unary(
                method.path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=method.response.FromString,
            )
            for name, method in proto.METHODS.items()
        }

    def call(self, method: str, request: Any, timeout_s: float) -> Any:
        try:
            response = self._calls[method](request, timeout=timeout_s)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise HypercoreUnavailable(f"{method}: {code.name}: {details}") from e
            if code == grpc.StatusCode.UNKNOWN:
                raise error_from_text(details) from e
            raise HypercoreError(f"{method}: {code.name}: {details}") from e
        if method == "Logs":
            return proto.VmLogsResponse(logs=_unwrap_logs(response.logs))
        return response

    def close(self) -> None:
        self._channel.close()


class HttpTransport:
    """Hypercore's HTTP mirror at ``host:port``, over a small pool of keep-alive connections.

    ``timeout_s`` bounds connecting and each socket read or write (``http.client``'s timeout).
    Spawn always takes a fresh connection: a keep-alive connection the server has just closed
    fails ambiguously, and Spawn must not be sent twice. Other calls reuse idle connections and
    retry once on a fresh one when a reused connection turns out to be closed.
    """

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {address!r}")
        self._host, self._port = host.strip("[]"), int(port)
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue()
        self._closed = threading.Event()

    def _path(self, method: str, request: Any) -> tuple[str, str, bytes | None]:
        if method == "Spawn":
            return "POST", "/spawn", gojson.dumps(gojson.to_go(request))
        if method == "List":
            return "GET", "/list", None
        query = urllib.parse.urlencode({"id": request.id})
        return "GET", f"/{method.lower()}?{query}", None

    def _connection(self, timeout_s: float, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        if not fresh:
            try:
                conn = self._idle.get_nowait()
                conn.timeout = timeout_s
                if conn.sock is not None:
                    conn.sock.settimeout(timeout_s)
                return conn, True
            except queue.Empty:
                pass
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s), False

    def _release(self, conn: http.client.HTTPConnection) -> None:
        if self._closed.is_set() or self._idle.qsize() >= MAX_IDLE_CONNECTIONS:
            conn.close()
        else:
            self._idle.put(conn)

    def _exchange(
        self, verb: str, path: str, body: bytes | None, timeout_s: float, fresh: bool
    ) -> tuple[int, bytes]:
        conn, reused = self._connection(timeout_s, fresh)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(verb, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            if reused:
                return self._exchange(verb, path, body, timeout_s, fresh=True)
            raise
        except BaseException:
            conn.close()
            raise
        if len(data) > MAX_RESPONSE_BYTES or response.will_close:
            conn.close()
        else:
            self._release(conn)
        if len(data) > MAX_RESPONSE_BYTES:
            raise HypercoreError(f"{path}: response larger than {MAX_RESPONSE_BYTES} bytes")
        return response.status, data

    def call(self, method: str, request: Any, timeout_s: float) -> Any:
        if self._closed.is_set():
            raise HypercoreError("the client is closed")
        verb, path, body = self._path(method, request)
        try:
            status, data = self._exchange(verb, path, body, timeout_s, fresh=method == "Spawn")
        except (OSError, http.client.HTTPException) as e:
            # Refused, reset, timed out (socket.timeout is an OSError) or a garbled response.
            raise HypercoreUnavailable(f"{method}: {type(e).__name__}: {e}") from e
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as e:
            raise HypercoreError(f"{path}: HTTP {status}, not JSON: {data[:200]!r}") from e
        if status == 400 and isinstance(payload, dict) and isinstance(payload.get("error"), str):
            raise error_from_text(payload["error"])
        if status != 200 or not isinstance(payload, dict) or "response" not in payload:
            raise HypercoreError(f"{path}: unexpected HTTP {status}: {data[:200]!r}")
        result = payload["response"]
        try:
            if method == "Logs":
                # The mirror's /logs answers the log file's text itself, not a VmLogsResponse.
                if not isinstance(result, str):
                    raise gojson.GoJsonError(
                        f"logs: expected a string, got {type(result).__name__}"
                    )
                return proto.VmLogsResponse(logs=result)
            return gojson.from_go(result, proto.METHODS[method].response)
        except gojson.GoJsonError as e:
            raise HypercoreError(f"{path}: malformed response: {e}") from e

    def close(self) -> None:
        self._closed.set()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
