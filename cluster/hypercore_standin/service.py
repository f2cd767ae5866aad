"""The stand-in's two front doors onto one ``Host``: gRPC ``ClusterService`` and the HTTP mirror.

As in Hypercore's pkg/cluster/service.go: gRPC failures are status UNKNOWN carrying the error
text; the mirror answers any method on ``/spawn`` (JSON body), ``/stop?id=``, ``/list`` and
``/logs?id=`` with ``200 {"response": ...}`` or ``400 {"error": "..."}``, encoded the way Go's
``encoding/json`` encodes Hypercore's protobuf structs (``gojson``), and unknown paths get Go's
plain-text 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.hypercore import gojson, proto

from .host import Host, HostError

MAX_BODY_BYTES = 1024 * 1024


def grpc_handler(host: Host) -> grpc.GenericRpcHandler:
    """``ClusterService`` over gRPC (``grpc.aio``), served by ``host``."""

    async def spawn(request: Any) -> Any:
        return await host.spawn(request)

    async def stop(request: Any) -> Any:
        return await host.stop(request.id)

    async def list_(request: Any) -> Any:
        cached = host.cached_state()
        # Before the first refresh Hypercore lists its own nil entry, which marshals as {}.
        return proto.NodesStateResponse(states=[cached or proto.NodeStateResponse()])

    async def logs(request: Any) -> Any:
        return proto.VmLogsResponse(logs=host.logs_via_cluster(request.id))

    def unary(method: proto.Method, call: Callable[[Any], Awaitable[Any]]) -> grpc.RpcMethodHandler:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await call(request)
            except HostError as e:
                await context.abort(grpc.StatusCode.UNKNOWN, e.text)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=method.request.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    calls = {"Spawn": spawn, "Stop": stop, "List": list_, "Logs": logs}
    return grpc.method_handlers_generic_handler(
        proto.SERVICE, {name: unary(proto.METHODS[name], call) for name, call in calls.items()}
    )


def _answer(response: Any) -> Response:
    return Response(gojson.dumps({"response": response}), 200, media_type="application/json")


def _refuse(text: str) -> Response:
    return Response(gojson.dumps({"error": text}), 400, media_type="application/json")


async def _body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HostError("http: request body too large")
    return bytes(body)


def http_mirror(host: Host) -> ASGIApp:
    """Hypercore's HTTP mirror as an ASGI app, served by ``host``."""

    async def spawn(request: Request) -> Response:
        try:
            message = gojson.from_go(gojson.loads(await _body(request)), proto.VmSpawnRequest)
            return _answer(gojson.to_go(await host.spawn(message)))
        except gojson.GoJsonError as e:
            return _refuse(str(e))
        except HostError as e:
            return _refuse(e.text)

    async def stop(request: Request) -> Response:
        try:
            return _answer(gojson.to_go(await host.stop(request.query_params.get("id", ""))))
        except HostError as e:
            return _refuse(e.text)

    async def list_(request: Request) -> Response:
        cached = host.cached_state()
        # Before the first refresh Hypercore's own entry is a nil pointer: JSON null.
        return _answer({"states": [gojson.to_go(cached) if cached is not None else None]})

    async def logs(request: Request) -> Response:
        try:
            return _answer(host.logs_file(request.query_params.get("id", "")))
        except HostError as e:
            return _refuse(e.text)

    handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
        "/spawn": spawn,
        "/stop": stop,
        "/list": list_,
        "/logs": logs,
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no websockets
        handler = handlers.get(scope["path"])
        if handler is None:
            # Go's ServeMux: exact paths, any method, a plain-text 404 for the rest.
            response: Response = PlainTextResponse("404 page not found\n", 404)
        else:
            response = await handler(Request(scope, receive))
        await response(scope, receive, send)

    return app
