"""Join tickets: the book's rules, two connections racing, and the join service over HTTP."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from cluster.join.consoles import DirectoryConsoles, NoConsoles, attested
from cluster.join.service import MAX_BODY_BYTES, RateLimiter, build_app
from cluster.join.tickets import (
    KEEP_EXPIRED_S,
    InstanceState,
    LivenessUnknown,
    TicketBook,
    TicketExpired,
    TicketInUse,
    TicketRevoked,
    UnknownTicket,
    ticket_hash,
)
from cluster.node.join_key import (
    MAX_CLOCK_SKEW_S,
    JoinClaim,
    JoinKeyError,
    NodeKey,
    console_line,
    fingerprints_in,
    verify,
)

HOLDOFF_S = 20.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def never_alive(instance_id: str) -> InstanceState:
    """The GCS lists no node of the instance (a first redemption, or a redeemer never joined)."""
    return InstanceState.ABSENT


def always_alive(instance_id: str) -> InstanceState:
    return InstanceState.ALIVE


def dead(instance_id: str) -> InstanceState:
    """The GCS lists the instance's node as DEAD: it joined once and died (a respawn)."""
    return InstanceState.DEAD


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(tmp_path: Path, clock: Clock) -> TicketBook:
    return TicketBook(tmp_path / "join.db", rejoin_holdoff_s=HOLDOFF_S, clock=clock)


def test_only_a_hash_is_stored(book: TicketBook, tmp_path: Path) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    book.close()
    assert ticket.encode() not in (tmp_path / "join.db").read_bytes()
    with sqlite3.connect(tmp_path / "join.db") as db:
        assert db.execute("SELECT ticket_sha256 FROM tickets").fetchall() == [
            (ticket_hash(ticket),)
        ]
    assert (tmp_path / "join.db").stat().st_mode & 0o777 == 0o600


def test_the_database_and_its_wal_files_are_owner_only(tmp_path: Path) -> None:
    umask = os.umask(0o022)  # the usual umask, which gave -wal/-shm 0644 before
    try:
        book = TicketBook(tmp_path / "join.db")
    finally:
        os.umask(umask)
    book.mint("vm-1", ttl_s=60)  # a write: SQLite has created -wal and -shm by now
    files = [tmp_path / name for name in ("join.db", "join.db-wal", "join.db-shm")]
    try:
        assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
    finally:
        book.close()


def test_a_fresh_ticket_is_redeemed_without_asking_the_gcs(book: TicketBook) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    asked: list[str] = []

    def alive(instance_id: str) -> InstanceState:
        asked.append(instance_id)
        return InstanceState.ALIVE

    assert book.redeem(ticket, alive) == "vm-1"
    assert asked == []


def test_unknown_ticket(book: TicketBook) -> None:
    book.mint("vm-1", ttl_s=60)
    with pytest.raises(UnknownTicket) as refused:
        book.redeem("not-a-ticket", never_alive)
    assert refused.value.status_code == 401 and not refused.value.retryable


def test_a_ticket_never_redeemed_expires_for_good(book: TicketBook, clock: Clock) -> None:
    unused = book.mint("vm-1", ttl_s=60)
    clock.now += 60
    with pytest.raises(TicketExpired) as refused:
        book.redeem(unused, dead)
    assert refused.value.status_code == 410


def test_the_ttl_bounds_the_first_redemption_only(book: TicketBook, clock: Clock) -> None:
    """Hypercore may respawn the workload long after its ticket's TTL: it still rejoins."""
    used = book.mint("vm-2", ttl_s=60)
    book.redeem(used, never_alive)
    clock.now += KEEP_EXPIRED_S + 3600
    book.mint("vm-3", ttl_s=60)  # minting prunes old tickets: not a redeemed, live one
    assert book.redeem(used, dead) == "vm-2"
    book.revoke("vm-2")
    with pytest.raises(TicketRevoked):
        book.redeem(used, dead)


def test_revoked_ticket_is_refused_and_revoke_is_idempotent(book: TicketBook) -> None:
    first = book.mint("vm-1", ttl_s=60)
    second = book.mint("vm-1", ttl_s=60)
    other = book.mint("vm-2", ttl_s=60)
    assert book.revoke("vm-1") == 2
    assert book.revoke("vm-1") == 0
    for ticket in (first, second):
        with pytest.raises(TicketRevoked) as refused:
            book.redeem(ticket, never_alive)
        assert refused.value.status_code == 403
    assert book.redeem(other, never_alive) == "vm-2"


def test_reuse_is_refused_while_the_instance_is_alive(book: TicketBook, clock: Clock) -> None:
    ticket = book.mint("vm-1", ttl_s=3600)
    book.redeem(ticket, never_alive)
    clock.now += HOLDOFF_S + 1
    with pytest.raises(TicketInUse) as refused:
        book.redeem(ticket, always_alive)
    assert refused.value.status_code == 409 and refused.value.retryable
    assert refused.value.retry_after_s == HOLDOFF_S


def test_reuse_is_refused_during_the_holdoff_even_if_not_alive(
    book: TicketBook, clock: Clock
) -> None:
    """Between a redemption and the node registering, the GCS cannot vouch for the instance."""
    ticket = book.mint("vm-1", ttl_s=3600)
    book.redeem(ticket, never_alive)
    clock.now += 5
    with pytest.raises(TicketInUse) as refused:
        book.redeem(ticket, never_alive)
    assert refused.value.retry_after_s == pytest.approx(HOLDOFF_S - 5)


def test_a_respawned_instance_rejoins_once_its_old_node_is_dead(
    book: TicketBook, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    ticket = book.mint("vm-1", ttl_s=3600)
    book.redeem(ticket, never_alive)
    clock.now += HOLDOFF_S + 1
    with caplog.at_level(logging.WARNING, logger="hyperfleet.join"):
        assert book.redeem(ticket, dead) == "vm-1"
    record = book.lookup(ticket)
    assert record is not None and record.redemptions == 2
    assert "vm-1 redeemed again (redemption 2)" in caplog.text


def test_reuse_is_refused_while_no_node_of_the_instance_ever_joined(
    book: TicketBook, clock: Clock
) -> None:
    """Redeemed, but the GCS lists no node of the instance: no proof of a respawn, so a thief
    who read the ticket from List gets 409, however long after the holdoff."""
    ticket = book.mint("vm-1", ttl_s=3600)
    book.redeem(ticket, never_alive)
    for _ in range(3):
        clock.now += HOLDOFF_S * 10
        with pytest.raises(TicketInUse) as refused:
            book.redeem(ticket, never_alive)
        assert refused.value.status_code == 409 and refused.value.retryable
    record = book.lookup(ticket)
    assert record is not None and record.redemptions == 1


def test_a_dead_node_does_not_shorten_the_holdoff(book: TicketBook, clock: Clock) -> None:
    ticket = book.mint("vm-1", ttl_s=3600)
    book.redeem(ticket, never_alive)
    clock.now += HOLDOFF_S + 1
    book.redeem(ticket, dead)
    clock.now += 1
    with pytest.raises(TicketInUse) as refused:
        book.redeem(ticket, dead)
    assert refused.value.retry_after_s == pytest.approx(HOLDOFF_S - 1)


def test_liveness_unknown_refuses_and_spends_nothing(book: TicketBook, clock: Clock) -> None:
    ticket = book.mint("vm-1", ttl_s=3600)
    book.redeem(ticket, never_alive)
    clock.now += HOLDOFF_S + 1

    def gcs_down(instance_id: str) -> InstanceState:
        raise LivenessUnknown("the GCS did not answer", retry_after_s=5)

    with pytest.raises(LivenessUnknown):
        book.redeem(ticket, gcs_down)
    record = book.lookup(ticket)
    assert record is not None and record.redemptions == 1


def test_bad_mint_arguments(book: TicketBook) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        book.mint("vm-1", ttl_s=0)
    with pytest.raises(ValueError, match="instance_id"):
        book.mint("", ttl_s=60)


def _race(books: list[TicketBook], ticket: str, alive: Callable[[str], InstanceState]) -> list[str]:
    outcomes: list[str] = []
    start = threading.Barrier(len(books))

    def redeem(book: TicketBook) -> None:
        start.wait(timeout=10)
        try:
            outcomes.append(book.redeem(ticket, alive))
        except TicketInUse:
            outcomes.append("refused")

    threads = [threading.Thread(target=redeem, args=(b,)) for b in books]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sorted(outcomes)


def test_two_connections_racing_a_fresh_ticket_one_wins(tmp_path: Path, clock: Clock) -> None:
    books = [TicketBook(tmp_path / "join.db", clock=clock) for _ in range(4)]
    ticket = books[0].mint("vm-1", ttl_s=60)
    assert _race(books, ticket, never_alive) == ["refused"] * 3 + ["vm-1"]


def test_two_connections_racing_a_rejoin_one_wins(tmp_path: Path, clock: Clock) -> None:
    """Both read the ticket as redeemed once and its node as dead; the compare-and-set decides."""
    minter = TicketBook(tmp_path / "join.db", rejoin_holdoff_s=HOLDOFF_S, clock=clock)
    ticket = minter.mint("vm-1", ttl_s=3600)
    minter.redeem(ticket, never_alive)
    clock.now += HOLDOFF_S + 1
    books = [
        TicketBook(tmp_path / "join.db", rejoin_holdoff_s=HOLDOFF_S, clock=clock) for _ in range(2)
    ]
    both_checked = threading.Barrier(2)

    def dead_after_both_looked(instance_id: str) -> InstanceState:
        both_checked.wait(timeout=10)
        return InstanceState.DEAD

    assert _race(books, ticket, dead_after_both_looked) == ["refused", "vm-1"]


# The join service over HTTP (Starlette's test client, no network, no Ray).


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "ray_auth_token"
    path.write_text("the-token\n")
    return path


@pytest.fixture
def consoles_dir(tmp_path: Path) -> Path:
    path = tmp_path / "consoles"
    path.mkdir()
    return path


def _app(book: TicketBook, token_file: Path, consoles_dir: Path, **kwargs: Any) -> TestClient:
    return TestClient(
        build_app(book, token_file, always_alive, DirectoryConsoles(consoles_dir), **kwargs)
    )


def _boot(consoles_dir: Path, instance_id: str, *extra_lines: str) -> NodeKey:
    """A node's boot: a fresh key whose fingerprint it prints to its console."""
    key = NodeKey.generate()
    lines = ["starting", console_line(key.fingerprint), *extra_lines]
    (consoles_dir / f"{instance_id}.log").write_text("\n".join(lines) + "\n")
    return key


def test_join_service_answers_the_token_sealed_to_the_node(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    key = _boot(consoles_dir, "vm-1")
    client = _app(book, token_file, consoles_dir)
    response = client.post("/v1/join", json=key.signed_request(ticket, "vm-1", time.time()))
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == {"sealed_token", "instance_id"} and answer["instance_id"] == "vm-1"
    assert "the-token" not in response.text
    assert key.open(answer["sealed_token"], "vm-1") == b"the-token"
    # Sealed to this node's key and instance: no other key opens it, nor another instance id.
    with pytest.raises(JoinKeyError):
        NodeKey.generate().open(answer["sealed_token"], "vm-1")
    with pytest.raises(JoinKeyError):
        key.open(answer["sealed_token"], "vm-2")
    again = client.post("/v1/join", json=key.signed_request(ticket, "vm-1", time.time()))
    assert again.status_code == 409
    assert again.json()["error"]["type"] == "ticket_in_use"
    assert int(again.headers["Retry-After"]) >= 1


def test_a_thief_with_the_ticket_but_not_the_key_is_refused_and_burns_nothing(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    """The ticket is public (Hypercore's List shows env), and so is the node's fingerprint
    (Logs): neither lets anyone else join, nor lock the node out."""
    ticket = book.mint("vm-1", ttl_s=60)
    key = _boot(consoles_dir, "vm-1")
    client = _app(book, token_file, consoles_dir)
    thief = NodeKey.generate()
    stolen = thief.signed_request(ticket, "vm-1", time.time())
    response = client.post("/v1/join", json=stolen)
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "key_not_attested"
    # The node's public key, read from its request or console, signed by the thief's key.
    forged = {**stolen, "signing_key": key.signed_request(ticket, "vm-1", 0)["signing_key"]}
    assert client.post("/v1/join", json=forged).json()["error"]["type"] == "bad_signature"
    # The node's own request, replayed with the thief's encryption key swapped in.
    replayed = key.signed_request(ticket, "vm-1", time.time())
    swapped = {**replayed, "encryption_key": stolen["encryption_key"]}
    assert client.post("/v1/join", json=swapped).json()["error"]["type"] == "bad_signature"
    record = book.lookup(ticket)
    assert record is not None and record.redemptions == 0
    # The real node still joins.
    response = client.post("/v1/join", json=replayed)
    assert response.status_code == 200
    assert key.open(response.json()["sealed_token"], "vm-1") == b"the-token"


def test_a_console_with_two_fingerprints_attests_neither(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    thief = NodeKey.generate()
    key = _boot(consoles_dir, "vm-1", console_line(thief.fingerprint))
    client = _app(book, token_file, consoles_dir)
    for who in (key, thief):
        response = client.post("/v1/join", json=who.signed_request(ticket, "vm-1", time.time()))
        assert response.json()["error"]["type"] == "key_not_attested"
    assert book.lookup(ticket).redemptions == 0  # type: ignore[union-attr]


def test_a_ticket_joins_only_the_instance_it_was_minted_for(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    key = _boot(consoles_dir, "vm-2")  # a node of another instance, with its key in its console
    client = _app(book, token_file, consoles_dir)
    response = client.post("/v1/join", json=key.signed_request(ticket, "vm-2", time.time()))
    assert (response.status_code, response.json()["error"]["type"]) == (401, "unknown_ticket")
    assert book.lookup(ticket).redemptions == 0  # type: ignore[union-attr]


def test_a_stale_request_is_refused(book: TicketBook, token_file: Path, consoles_dir: Path) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    key = _boot(consoles_dir, "vm-1")
    client = _app(book, token_file, consoles_dir, clock=lambda: 10_000.0)
    old = key.signed_request(ticket, "vm-1", 10_000.0 - MAX_CLOCK_SKEW_S - 1)
    response = client.post("/v1/join", json=old)
    assert (response.status_code, response.json()["error"]["type"]) == (401, "bad_signature")
    fresh = key.signed_request(ticket, "vm-1", 10_000.0)
    assert client.post("/v1/join", json=fresh).status_code == 200


def test_a_head_that_cannot_read_consoles_refuses_every_join(
    book: TicketBook, token_file: Path
) -> None:
    ticket = book.mint("vm-1", ttl_s=60)
    client = TestClient(build_app(book, token_file, always_alive, NoConsoles()))
    key = NodeKey.generate()
    response = client.post("/v1/join", json=key.signed_request(ticket, "vm-1", time.time()))
    assert (response.status_code, response.json()["error"]["type"]) == (
        503,
        "consoles_unavailable",
    )
    assert book.lookup(ticket).redemptions == 0  # type: ignore[union-attr]


def test_directory_consoles_stay_in_their_directory(tmp_path: Path) -> None:
    (tmp_path / "outside.log").write_text(console_line("SHA256:" + "A" * 43))
    consoles = DirectoryConsoles(tmp_path / "consoles")
    assert consoles.consoles("../outside", "t") == []
    assert consoles.consoles("..", "t") == []
    assert consoles.consoles("vm-1", "t") == []


def test_fingerprints_count_only_on_a_line_of_their_own() -> None:
    fp = NodeKey.generate().fingerprint
    assert fingerprints_in(f"x\n{console_line(fp)}\n") == {fp}
    assert fingerprints_in(f"x\r\n{console_line(fp)}\r\n") == {fp}
    assert fingerprints_in(f"said: {console_line(fp)}\n") == set()
    assert fingerprints_in(f"{console_line(fp)}trailing\n") == set()
    assert attested([f"{console_line(fp)}\n"], fp)
    assert not attested(["nothing here"], fp)


def test_a_tampered_claim_does_not_verify() -> None:
    key = NodeKey.generate()
    request = key.signed_request("ticket", "vm-1", 1_000.0)
    signature = str(request.pop("signature"))
    claim = JoinClaim(**request)  # type: ignore[arg-type]
    verify(claim, signature, 1_000.0)
    for field, value in (("ticket", "other"), ("instance_id", "vm-2"), ("timestamp", 1_001)):
        tampered = JoinClaim(**{**request, field: value})  # type: ignore[arg-type]
        with pytest.raises(JoinKeyError, match="does not verify"):
            verify(tampered, signature, 1_000.0)
    with pytest.raises(JoinKeyError):
        verify(claim, "A" * 86, 1_000.0)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b'{"ticket": "nope"}', 400, "invalid_request"),  # unsigned: today's request shape
        (b'{"ticket": ""}', 400, "invalid_request"),
        (b"not json", 400, "invalid_request"),
        (b'{"ticket": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "request_too_large"),
    ],
)
def test_join_service_errors(
    book: TicketBook, token_file: Path, consoles_dir: Path, body: bytes, status: int, kind: str
) -> None:
    response = _app(book, token_file, consoles_dir).post("/v1/join", content=body)
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind
    assert response.json()["error"]["message"]


def test_join_service_refuses_an_unknown_ticket_and_extra_fields(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    client = _app(book, token_file, consoles_dir)
    request = NodeKey.generate().signed_request("nope", "vm-1", time.time())
    response = client.post("/v1/join", json=request)
    assert (response.status_code, response.json()["error"]["type"]) == (401, "unknown_ticket")
    response = client.post("/v1/join", json={**request, "more": 1})
    assert (response.status_code, response.json()["error"]["type"]) == (400, "invalid_request")


def test_join_service_other_routes_use_the_error_shape(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    client = _app(book, token_file, consoles_dir)
    assert client.get("/v1/join").json()["error"]["type"] == "http_error"
    assert client.get("/").status_code == 404


def test_join_service_rate_limits_per_address(
    book: TicketBook, token_file: Path, consoles_dir: Path
) -> None:
    now = [0.0]
    limiter = RateLimiter(per_min=60, burst=3, clock=lambda: now[0])
    client = _app(book, token_file, consoles_dir, limiter=limiter)
    request = NodeKey.generate().signed_request("x", "vm-1", time.time())
    codes = [client.post("/v1/join", json=request).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    now[0] += 1.0  # one more token at 1 a second
    assert client.post("/v1/join", json=request).status_code == 401


def test_rate_limiter_is_bounded() -> None:
    limiter = RateLimiter(per_min=60, burst=1, max_addresses=2, clock=lambda: 0.0)
    assert limiter.admit("a") is None
    assert limiter.admit("a") == pytest.approx(1.0)
    limiter.admit("b")
    limiter.admit("c")  # evicts "a", the least recently seen
    assert limiter.admit("a") is None
