"""Which client a request comes from, for the per-address rate limit (docs/security.md).

A client chooses every header it sends, so an address is believed only as far as a hop we trust
vouches for it:

- The TCP peer is the starting point. Serve's proxies run uvicorn, which replaces the peer with
  ``X-Forwarded-For`` when the peer is in ``FORWARDED_ALLOW_IPS`` (127.0.0.1 by default): every
  node Hyperfleet starts sets it empty (``cluster/cli/servers.py``'s ``NODE_RAY_ENV``, the node
  agent's ``ray start``), so the peer is the TCP peer; an ingress on a node without it says so
  in its log at start.
- Behind Serve's HAProxy the TCP peer is HAProxy itself. Hyperfleet's HAProxy shim
  (``cluster/cli/haproxy_shim.py``) makes HAProxy overwrite ``X-Hyperfleet-Peer`` with the peer it
  saw and ``X-Hyperfleet-Proxy-Token`` with a secret only HAProxy and the ingress hold; the
  ingress believes the first only with the second, compared in constant time. A token, not the
  peer's address, because the replica's own HTTP port is reachable from every process on the
  node (and HAProxy may run on another node than the replica).
- Only a peer in the operator's ``trusted_proxies`` (none by default) may name someone else: the
  forwarding header the operator names (one, because a proxy that sets ``X-Forwarded-For``
  passes a client's ``Forwarded`` through untouched, and the other way round) is walked from the
  right, past trusted hops, to the first address not trusted. An entry that is not an address
  (``unknown``, an obfuscated name, garbage) stops the walk at the last hop vouched for.

The limit's key is the address, except that an IPv6 client is keyed by its /64: one host gets a
whole /64 and could otherwise take a new window per request.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]

# What uvicorn reads: empty, it never replaces the TCP peer with a header.
UVICORN_TRUST_ENV = "FORWARDED_ALLOW_IPS"
PEER_HEADER = "x-hyperfleet-peer"
PROXY_TOKEN_HEADER = "x-hyperfleet-proxy-token"  # noqa: S105 (a header's name)
IPV6_PREFIX = 64
# A chain longer than this is not walked further (its left part names no hop we trust anyway).
MAX_FORWARDED_HOPS = 32
UNKNOWN = "unknown"
# RFC 7239: ``for=`` in one forwarded-element, its value a token or a quoted string.
_FORWARDED_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)


def parse_networks(values: Iterable[str], what: str) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks.

    Raises:
        ValueError: one is not a network, or has host bits set (``10.0.0.1/8`` is a typo for
            ``10.0.0.0/8`` or ``10.0.0.1/32``, and guessing which would trust the wrong hosts).
    """
    networks = []
    for value in values:
        text = value.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            raise ValueError(f"{what}: {text!r} is not a CIDR such as 10.0.0.0/8 ({e})") from e
    return tuple(networks)


def split_cidrs(value: str) -> list[str]:
    """``a,b, c`` (a command-line flag) as its items; empty items are dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_address(text: str) -> Address | None:
    """An address as a header or a socket gives it (``1.2.3.4``, ``1.2.3.4:80``, ``::1``,
    ``[::1]:80``, ``"[::1]"``), or None when it is not one. IPv4-mapped IPv6 is the IPv4."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or not (text[end + 1 :] == "" or text[end + 1 :].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_chain(headers: Mapping[str, str], header: ForwardedHeader) -> list[str]:
    """The hops a forwarding header lists, leftmost (the claimed client) first. Several
    instances of the header are one list, in order (RFC 9110 section 5.3)."""
    values = _all(headers, header)
    if header == "x-forwarded-for":
        return [hop.strip() for value in values for hop in value.split(",")]
    hops = []
    for value in values:
        for element in value.split(","):
            found = _FORWARDED_FOR.search(element)
            hops.append(found.group(1) if found else "")
    return hops


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:  # starlette's Headers: every instance
        return list(getlist(name))
    value = headers.get(name)
    return [] if value is None else [value]


@dataclass(frozen=True)
class ClientAddresses:
    """How the ingress finds a request's client and its rate-limit key.

    ``trusted_proxies``: peers whose ``forwarded_header`` is believed. ``exempt``: clients that
    skip the per-address limit (keys and per-user limits still apply). ``proxy_token``: the
    secret that vouches for ``X-Hyperfleet-Peer`` (None: the header is ignored).
    """

    trusted_proxies: tuple[Network, ...] = ()
    exempt: tuple[Network, ...] = ()
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    proxy_token: str | None = None

    def peer(self, tcp_peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The peer the ingress believes: HAProxy's word for it when the token vouches for it,
        else the TCP peer."""
        if self.proxy_token is not None:
            token = headers.get(PROXY_TOKEN_HEADER)
            said = headers.get(PEER_HEADER)
            if (
                token is not None
                and said is not None
                and hmac.compare_digest(token.encode(), self.proxy_token.encode())
            ):
                return said
        return tcp_peer

    def client(self, tcp_peer: str | None, headers: Mapping[str, str]) -> Address | None:
        """The client's address, or None when even the peer is not an address."""
        peer = self.peer(tcp_peer, headers)
        address = None if peer is None else parse_address(peer)
        if address is None or not self._trusted(address):
            return address
        hops = forwarded_chain(headers, self.forwarded_header)
        for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
            named = parse_address(hop)
            if named is None:
                return address  # the last hop vouched for
            address = named
            if not self._trusted(address):
                return address
        return address  # every hop is trusted: the leftmost is the client

    def rate_key(self, tcp_peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The per-address window's key for a request, or None when it is exempt."""
        address = self.client(tcp_peer, headers)
        if address is None:
            return UNKNOWN
        if any(address in network for network in self.exempt):
            return None
        if isinstance(address, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
        return str(address)

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted_proxies)
