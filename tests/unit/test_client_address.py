"""Whose address a request is counted under (``serve_app/client_address.py``): the TCP peer, or
what a trusted hop says, never what a client says of itself."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.testclient import TestClient

from actors import RuntimeConfig
from serve_app.admission import ControlGate
from serve_app.app import Api
from serve_app.client_address import ClientAddresses, parse_address, parse_networks
from serve_app.control import ControlStore
from serve_app.deployment import IngressConfig
from serve_app.replicas import Replicas
from serve_app.routes import build_app

from .in_process_control import InProcessControl

TOKEN = "t0ken-t0ken-t0ken-t0ken"
PROXY = ClientAddresses(trusted_proxies=parse_networks(["10.0.0.0/8", "fd00::/8"], "test"))


def _headers(*pairs: tuple[str, str]) -> Headers:
    return Headers(raw=[(k.lower().encode(), v.encode()) for k, v in pairs])


def _key(policy: ClientAddresses, peer: str | None, *pairs: tuple[str, str]) -> str | None:
    headers: Mapping[str, str] = _headers(*pairs)
    return policy.rate_key(peer, headers)


def test_an_untrusted_peer_is_the_client_whatever_it_says() -> None:
    policy = ClientAddresses()
    assert _key(policy, "203.0.113.7") == "203.0.113.7"
    spoofs = [
        ("X-Forwarded-For", "198.51.100.1"),
        ("Forwarded", "for=198.51.100.1"),
        ("X-Hyperfleet-Peer", "198.51.100.1"),
        ("X-Real-IP", "198.51.100.1"),
    ]
    for spoof in spoofs:
        assert _key(policy, "203.0.113.7", spoof) == "203.0.113.7", spoof
    # Not even from loopback: HAProxy and every local process connect from there.
    assert _key(policy, "127.0.0.1", ("X-Forwarded-For", "198.51.100.1")) == "127.0.0.1"
    assert _key(PROXY, "203.0.113.7", ("X-Forwarded-For", "198.51.100.1")) == "203.0.113.7"


def test_a_trusted_proxy_chain_is_walked_from_the_right_to_the_first_untrusted_hop() -> None:
    # The client forged the leftmost entry; the two proxies appended what they saw.
    chain = ("X-Forwarded-For", "1.1.1.1, 203.0.113.7, 10.0.0.5")
    assert _key(PROXY, "10.0.0.9", chain) == "203.0.113.7"
    # Several header lines are one list, in order.
    split = [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "203.0.113.7:5555")]
    assert _key(PROXY, "10.0.0.9", *split) == "203.0.113.7"
    # Every hop trusted: the leftmost is the client (a proxy calling the API itself).
    assert _key(PROXY, "10.0.0.9", ("X-Forwarded-For", "10.1.1.1, 10.0.0.5")) == "10.1.1.1"
    # No header from a trusted proxy: the proxy itself.
    assert _key(PROXY, "10.0.0.9") == "10.0.0.9"


def test_garbage_in_a_chain_stops_the_walk_at_the_last_hop_vouched_for() -> None:
    for garbage in ["unknown", "", "not-an-ip", "1.2.3.4.5", "[::1", "::1]:80", "_hidden"]:
        chain = ("X-Forwarded-For", f"198.51.100.1, {garbage}")
        assert _key(PROXY, "10.0.0.9", chain) == "10.0.0.9", garbage
        chain = ("X-Forwarded-For", f"{garbage}, 10.0.0.5")
        assert _key(PROXY, "10.0.0.9", chain) == "10.0.0.5", garbage
    # A peer that is no address (a Unix socket, a test client) is one shared "unknown" window.
    assert _key(PROXY, "testclient") == "unknown"
    assert _key(PROXY, None) == "unknown"


def test_the_forwarded_header_is_read_only_when_the_operator_names_it() -> None:
    rfc7239 = ClientAddresses(PROXY.trusted_proxies, forwarded_header="forwarded")
    header = ("Forwarded", 'for=1.1.1.1;proto=https, for="[2001:db8::7]:4711";by=10.0.0.5')
    assert _key(rfc7239, "10.0.0.9", header) == "2001:db8::/64"
    assert _key(rfc7239, "10.0.0.9", ("Forwarded", "For=203.0.113.7")) == "203.0.113.7"
    assert _key(rfc7239, "10.0.0.9", ("Forwarded", "for=unknown")) == "10.0.0.9"
    assert _key(rfc7239, "10.0.0.9", ("Forwarded", "proto=https")) == "10.0.0.9"
    # A proxy that sets one header passes the other through as the client wrote it.
    assert _key(rfc7239, "10.0.0.9", ("X-Forwarded-For", "1.1.1.1")) == "10.0.0.9"
    assert _key(PROXY, "10.0.0.9", ("Forwarded", "for=1.1.1.1")) == "10.0.0.9"


def test_ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() -> None:
    policy = ClientAddresses()
    assert _key(policy, "2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert _key(policy, "2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert _key(policy, "2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert _key(policy, "::ffff:203.0.113.7") == "203.0.113.7"
    chain = ("X-Forwarded-For", "[2001:db8::1]:443, fd00::5")
    assert _key(PROXY, "fd00::9", chain) == "2001:db8::/64"
    assert parse_address("[::1]:80") == parse_address("::1")
    assert parse_address('"[::1]"') == parse_address("::1")


def test_haproxys_word_for_the_peer_needs_the_token() -> None:
    policy = ClientAddresses(proxy_token=TOKEN)
    vouched = [("X-Hyperfleet-Peer", "203.0.113.7"), ("X-Hyperfleet-Proxy-Token", TOKEN)]
    assert _key(policy, "127.0.0.1", *vouched) == "203.0.113.7"
    forged = [("X-Hyperfleet-Peer", "203.0.113.7"), ("X-Hyperfleet-Proxy-Token", "guess")]
    assert _key(policy, "127.0.0.1", *forged) == "127.0.0.1"
    assert _key(policy, "127.0.0.1", ("X-Hyperfleet-Peer", "203.0.113.7")) == "127.0.0.1"
    # Without a token configured, the header means nothing.
    assert _key(ClientAddresses(), "127.0.0.1", *vouched) == "127.0.0.1"
    # The peer HAProxy names is a client like any other: its X-Forwarded-For is not believed
    # unless that peer is a trusted proxy.
    spoof = ("X-Forwarded-For", "198.51.100.1")
    assert _key(policy, "127.0.0.1", *vouched, spoof) == "203.0.113.7"
    behind = ClientAddresses(PROXY.trusted_proxies, proxy_token=TOKEN)
    via_lb = [("X-Hyperfleet-Peer", "10.0.0.5"), ("X-Hyperfleet-Proxy-Token", TOKEN), spoof]
    assert _key(behind, "127.0.0.1", *via_lb) == "198.51.100.1"


def test_exempt_networks_skip_the_address_window() -> None:
    policy = ClientAddresses(exempt=parse_networks(["127.0.0.4/32", "2001:db8::/32"], "test"))
    assert _key(policy, "127.0.0.4") is None
    assert _key(policy, "2001:db8:5::1") is None
    assert _key(policy, "127.0.0.5") == "127.0.0.5"
    # A client cannot claim to be exempt.
    assert _key(policy, "127.0.0.5", ("X-Forwarded-For", "127.0.0.4")) == "127.0.0.5"


def test_settings_reject_what_is_not_a_cidr_with_a_message() -> None:
    for bad in ["10.0.0.1/8", "10.0.0.0/33", "example.com", "10.0.0.0/8,"]:
        with pytest.raises(ValueError, match="is not a CIDR"):
            parse_networks([bad], "--ip-exempt")
    runtime: dict[str, Any] = {}
    with pytest.raises(ValidationError, match=r"'10\.0\.0\.1/8' is not a CIDR"):
        IngressConfig.model_validate({"runtime": runtime, "trusted_proxies": ["10.0.0.1/8"]})
    with pytest.raises(ValidationError, match="ip_exempt"):
        IngressConfig.model_validate({"runtime": runtime, "ip_exempt": ["nope"]})
    config = IngressConfig.model_validate(
        {"runtime": runtime, "ip_exempt": ["127.0.0.4", "::1/128"], "proxy_token": TOKEN}
    )
    assert config.client_addresses().exempt == parse_networks(["127.0.0.4/32", "::1"], "t")


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = ControlStore(tmp_path / "control.db")
    yield store
    store.close()


def test_each_client_address_gets_its_own_window_in_the_api(store: ControlStore) -> None:
    """In-process, as behind Serve's Python proxy: the TCP peer is the client."""
    control: Any = InProcessControl(store)
    policy = ClientAddresses(exempt=parse_networks(["127.0.0.4/32"], "test"))
    app = build_app(
        Api(control, Replicas(RuntimeConfig()), ControlGate(control), 3, addresses=policy)
    )

    def statuses(host: str, n: int, headers: dict[str, str] | None = None) -> list[int]:
        with TestClient(app, client=(host, 40000)) as client:
            return [client.get("/v1/usage", headers=headers).status_code for _ in range(n)]

    assert statuses("127.0.0.2", 4) == [401, 401, 401, 429]
    # Another address has its own window, and no header moves a request to another one.
    spoof = {"X-Forwarded-For": "198.51.100.9", "X-Hyperfleet-Peer": "198.51.100.9"}
    assert statuses("127.0.0.3", 4, spoof) == [401, 401, 401, 429]
    assert statuses("198.51.100.9", 1) == [401]
    assert statuses("127.0.0.4", 8) == [401] * 8  # exempt: still needs a key
    store.create_user("usr_a", "a", {"requests_per_minute": 5})
    auth = {"Authorization": "Bearer " + store.issue_key("usr_a").api_key}
    assert statuses("127.0.0.4", 6, auth) == [200] * 5 + [429]  # the user's own limit holds
