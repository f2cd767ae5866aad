"""The head's join service: a signed ``POST /v1/join`` answers with the sealed Ray auth token.

It runs on the head beside ``ray start --head``, in its own process (the node agent passes it the
listening socket, so the port is bound before any worker asks and survives a restart of this
process). It is the one place a ticket turns into the token, so it is small and strict: a body
limit, a per-address rate limit, JSON errors in the repository's shape, and the liveness check of
``TicketBook.redeem`` answered by the GCS node table (``GcsLiveness``), the only call to Ray here.
A ticket is redeemed only for a request signed by a key that the instance's own console shows
(``cluster.node.join_key``, ``cluster.join.consoles``; ``docs/join.md`` has the threat model).
Each answer is counted by outcome, and ``GET /metrics`` serves the counts (``metrics``).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cluster.hypercore import HypercoreClient
from cluster.node import join_key
from cluster.node.gcs import GCS_TIMEOUT_S, GcsUnavailable, instance_nodes
from cluster.node.join_key import JoinClaim, JoinKeyError
from hyperfleet import logs

from .consoles import (
    NOT_ATTESTED_RETRY_S,
    Consoles,
    DirectoryConsoles,
    HypercoreConsoles,
    KeyNotAttested,
    NoConsoles,
    attested,
)
from .metrics import JoinMetrics, JoinOutcome
from .tickets import (
    MAX_INSTANCE_ID_CHARS,
    InstanceState,
    JoinError,
    LivenessUnknown,
    TicketBook,
    UnknownTicket,
)

logger = logging.getLogger("hyperfleet.join")

MAX_BODY_BYTES = 4096
MAX_TICKET_CHARS = 256
RATE_PER_MIN = 60.0  # a worker retries every few seconds at most; 1 a second is generous
RATE_BURST = 20.0
MAX_TRACKED_ADDRESSES = 4096
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 64


B64_KEY = r"^[A-Za-z0-9_-]{43}$"  # 32 bytes, unpadded URL-safe base64


class JoinRequest(BaseModel):
    """A signed join request (``cluster.node.join_key.NodeKey.signed_request``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ticket: str = Field(min_length=1, max_length=MAX_TICKET_CHARS)
    instance_id: str = Field(min_length=1, max_length=MAX_INSTANCE_ID_CHARS)
    signing_key: str = Field(pattern=B64_KEY)
    encryption_key: str = Field(pattern=B64_KEY)
    timestamp: int = Field(ge=0)
    nonce: str = Field(pattern=r"^[A-Za-z0-9_-]{22}$")
    signature: str = Field(pattern=r"^[A-Za-z0-9_-]{86}$")

    def claim(self) -> JoinClaim:
        return JoinClaim(
            ticket=self.ticket,
            instance_id=self.instance_id,
            signing_key=self.signing_key,
            encryption_key=self.encryption_key,
            timestamp=self.timestamp,
            nonce=self.nonce,
        )


class RateLimiter:
    """A token bucket per client address, holding at most ``max_addresses`` buckets (LRU)."""

    def __init__(
        self,
        per_min: float = RATE_PER_MIN,
        burst: float = RATE_BURST,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate_per_s = per_min / 60.0
        self._burst = burst
        self._max = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def admit(self, address: str) -> float | None:
        """None if admitted, else the seconds until the next request would be."""
        now = self._clock()
        tokens, last = self._buckets.pop(address, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate_per_s)
        admitted = tokens >= 1.0
        self._buckets[address] = (tokens - 1.0 if admitted else tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return None if admitted else (1.0 - tokens) / self._rate_per_s


def _error(status: int, kind: str, message: str, retry_after_s: float | None = None) -> Response:
    headers = {} if retry_after_s is None else {"Retry-After": str(max(1, round(retry_after_s)))}
    body = {"error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request: Request) -> bytes | None:
    """The body, or None once it passes ``MAX_BODY_BYTES`` (whatever Content-Length claims)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    book: TicketBook,
    token_file: Path,
    liveness: Callable[[str], InstanceState],
    consoles: Consoles,
    limiter: RateLimiter | None = None,
    clock: Callable[[], float] = time.time,
    metrics: JoinMetrics | None = None,
) -> Starlette:
    """The join service's ASGI app.

    A request is checked in this order, and only the last step touches the ticket: its
    signature and timestamp; the ticket exists and was minted for the instance the request
    names; a console of that instance shows the request's key (``consoles``); then
    ``TicketBook.redeem``. So a request without the node's key never spends a ticket.

    Args:
        book: where tickets are redeemed.
        token_file: the Ray auth token, read at each redemption (so a rotated token is served).
        liveness: what the GCS says about an instance id's nodes (``GcsLiveness`` in production).
        consoles: where an instance's console is read (``HypercoreConsoles`` in production).
        limiter: per-address rate limit; default ``RateLimiter()``.
        clock: seconds since the epoch, for the request's timestamp.
        metrics: where each answer is counted, served at ``GET /metrics``; default a fresh
            ``JoinMetrics``.
    """
    limiter = limiter or RateLimiter()
    metrics = metrics or JoinMetrics()

    def verify(request: JoinRequest) -> str:
        """The instance id, once everything but the ticket's redemption checked out."""
        claim = request.claim()
        join_key.verify(claim, request.signature, clock())
        record = book.lookup(request.ticket)
        if record is None or record.instance_id != request.instance_id:
            # The same answer for both: no oracle for which instance a ticket is for.
            raise UnknownTicket("unknown join ticket")
        if not attested(consoles.consoles(record.instance_id, request.ticket), claim.fingerprint):
            raise KeyNotAttested(
                f"no console of instance {record.instance_id} shows the key {claim.fingerprint}",
                retry_after_s=NOT_ATTESTED_RETRY_S,
            )
        return book.redeem(request.ticket, liveness)

    async def join(request: Request) -> Response:
        outcome = JoinOutcome.ERROR
        try:
            outcome, response = await answer(request)
            return response
        finally:  # an exception is counted as an error, then left to Starlette (a 500)
            metrics.count(outcome)

    async def answer(request: Request) -> tuple[JoinOutcome, Response]:
        address = request.client.host if request.client else "unknown"
        if (wait_s := limiter.admit(address)) is not None:
            return JoinOutcome.RATE_LIMITED, _error(
                429, "rate_limited", "too many join attempts", wait_s
            )
        body = await _read_body(request)
        if body is None:
            return JoinOutcome.INVALID, _error(
                413, "request_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes"
            )
        try:
            join_request = JoinRequest.model_validate_json(body)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return JoinOutcome.INVALID, _error(400, "invalid_request", f"{where}: {first['msg']}")
        try:
            # SQLite, Hypercore and the GCS block: keep them off the event loop.
            instance_id = await run_in_threadpool(verify, join_request)
        except (JoinError, JoinKeyError) as e:
            logger.warning("join refused for %s: %s", address, e.message)
            return _refusal_outcome(e), _error(
                e.status_code, e.error_type, e.message, e.retry_after_s
            )
        token = (await run_in_threadpool(token_file.read_text)).strip().encode()
        sealed = join_key.seal(token, join_request.encryption_key, instance_id)
        logger.info(
            "instance %s joined from %s with key %s",
            instance_id,
            address,
            join_request.claim().fingerprint,
        )
        return JoinOutcome.JOINED, JSONResponse(
            {"sealed_token": sealed, "instance_id": instance_id}
        )

    async def serve_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=JoinMetrics.CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(
            exc.status_code,
            "not_found" if exc.status_code == 404 else "http_error",
            str(exc.detail),
        )

    return Starlette(
        routes=[
            Route("/v1/join", join, methods=["POST"]),
            Route("/metrics", serve_metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


def _refusal_outcome(error: JoinError | JoinKeyError) -> JoinOutcome:
    if isinstance(error, KeyNotAttested):
        return JoinOutcome.UNATTESTED
    if error.status_code == 503:
        return JoinOutcome.UNAVAILABLE
    return JoinOutcome.REFUSED


class GcsLiveness:
    """``liveness(instance_id)``: ALIVE if the GCS lists an ALIVE node with that cloud instance
    id, DEAD if it lists only DEAD ones (a DEAD node is the proof of a respawn that a rejoin
    needs), ABSENT if none."""

    def __init__(
        self, gcs_address: str, token_path: Path, timeout_s: float = GCS_TIMEOUT_S
    ) -> None:
        self._gcs_address = gcs_address
        self._token_path = token_path
        self._timeout_s = timeout_s

    def __call__(self, instance_id: str) -> InstanceState:
        try:
            nodes = instance_nodes(
                self._gcs_address, self._token_path, instance_id, timeout_s=self._timeout_s
            )
        except GcsUnavailable as e:
            raise LivenessUnknown(e.message, retry_after_s=self._timeout_s) from e
        if any(node.alive for node in nodes):
            return InstanceState.ALIVE
        return InstanceState.DEAD if nodes else InstanceState.ABSENT


def serve(
    listener: socket.socket,
    db_path: Path,
    token_file: Path,
    gcs_address: str,
    consoles: Consoles,
) -> None:
    """Serves the join service on an already listening socket until SIGTERM/SIGINT."""
    book = TicketBook(db_path)
    app = build_app(book, token_file, GcsLiveness(gcs_address, token_file), consoles)
    config = uvicorn.Config(
        app,
        fd=listener.fileno(),
        log_level="warning",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=MAX_CONNECTIONS,
        server_header=False,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        book.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.join.service",
        description="The head's join service (started by `hyperfleet node` on the head).",
    )
    parser.add_argument("--fd", type=int, required=True, help="an inherited listening socket")
    parser.add_argument("--db", type=Path, required=True, help="the ticket book (SQLite)")
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--gcs-address", required=True, help="HOST:PORT of the head's GCS")
    parser.add_argument("--hypercore-address", help="the cluster's Hypercore, to read consoles")
    parser.add_argument("--hypercore-transport", choices=("grpc", "http"), default="grpc")
    parser.add_argument(
        "--image", action="append", default=[], help="a node image of the cluster (repeatable)"
    )
    parser.add_argument(
        "--consoles-dir", type=Path, help="consoles as <dir>/<instance id>.log (no Hypercore)"
    )
    args = parser.parse_args(argv)
    logs.configure("join-service")
    consoles: Consoles
    if args.consoles_dir is not None:
        consoles = DirectoryConsoles(args.consoles_dir)
    elif args.hypercore_address and args.image:
        client = HypercoreClient.connect(args.hypercore_address, transport=args.hypercore_transport)
        consoles = HypercoreConsoles(client, args.image)
    else:
        consoles = NoConsoles()
        logger.warning("no Hypercore and no consoles directory: every join will be refused")
    listener = socket.socket(fileno=args.fd)
    logger.info("serving on %s", listener.getsockname())
    serve(listener, args.db, args.token_file, args.gcs_address, consoles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
