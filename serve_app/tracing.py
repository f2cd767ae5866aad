"""Each request's trace: its id and the client's W3C ``traceparent``, on every log line it causes.

Serve gives every HTTP request an id (its ``RequestIdMiddleware`` puts the client's
``x-request-id``, or a new one, in the request's headers and answers with it); ``Traced`` reads
it, keeps a well-formed ``traceparent`` (a malformed one is dropped, not passed on), and runs the
request inside ``hyperfleet.logs.traced``, so the ingress's log lines carry them and
``logs.current()`` hands them to the replica that runs the turn (``backend.Replicas``), whose
lines, and model calls, carry them too. Outside Serve (the in-process app of the tests) it makes
the id and the response header itself.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyperfleet import logs

REQUEST_ID_HEADER = "x-request-id"


class Traced:
    """ASGI middleware: the request's id and ``traceparent`` as the log context of its work."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get(REQUEST_ID_HEADER)
        answered_with_id = request_id is not None  # Serve answers with it already
        request_id = request_id or uuid.uuid4().hex
        traceparent = logs.valid_traceparent(headers.get("traceparent"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and not answered_with_id:
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        with logs.traced(request_id=request_id, traceparent=traceparent):
            await self.app(scope, receive, send_with_id)
