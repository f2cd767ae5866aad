"""The firewall that lets egress-enabled tools reach the internet but not the platform.

Tools of agents with ``egress: true`` share the node's network namespace, so they run as their
own uid (``EGRESS_UID``) and the node's OUTPUT chain sends that uid's packets through
``HYPERFLEET-EGRESS``, which rejects (``blocked_destinations``):
- loopback, private, shared, link-local, multicast, broadcast and reserved ranges, where Ray,
  Redis, the stores, other nodes and cloud metadata live, in IPv4 and IPv6;
- the IPv6 forms of every blocked IPv4 range (v4-mapped ``::ffff:0:0/96`` entirely, NAT64
  ``64:ff9b::/96`` and 6to4 ``2002::/16`` embeddings), so a NAT64 gateway or a 6to4 relay is no
  way around the IPv4 rules;
- this node's own addresses and its default gateways (on Hypercore, the host);
- every address in Ray's node table (the cluster's other nodes, which may have public
  addresses), and what the operator lists (``RuntimeConfig.egress_blocked``: say, the Hypercore
  host's public address).
Everything else (the internet) passes. The rules match only that uid.

The chain is written whole, atomically, with ``iptables-restore --noflush`` (and
``ip6tables-restore``), the first time a replica runs an egress tool and again whenever what it
blocks changes: the addresses are read again at most every ``refresh_s`` before a tool runs, and
the replica refreshes them on its own schedule (``AgentActor``), so a node that joins the cluster
is blocked within that time even while a long tool runs. The firewall is plain: the cluster's
addresses come from a callable the replica gives it (the Ray call stays in ``actor.py``).

Without iptables, or without root, egress tools refuse to run: they never run unfiltered.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from .workspace import EGRESS_UID

logger = logging.getLogger(__name__)

CHAIN = "HYPERFLEET-EGRESS"
COMMAND_TIMEOUT_S = 10.0
REFRESH_S = 30.0
BLOCKED_V4 = (
    "0.0.0.0/8",  # this network
    "10.0.0.0/8",
    "100.64.0.0/10",  # shared (carrier-grade NAT)
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata
    "172.16.0.0/12",
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",
    "198.18.0.0/15",  # benchmarking, used inside networks
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the broadcast address
)
BLOCKED_V6 = (
    "::/128",
    "::1/128",
    "::ffff:0:0/96",  # v4-mapped: every IPv4 address written as IPv6
    "64:ff9b:1::/48",  # local-use NAT64
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated, still routed by some)
    "ff00::/8",  # multicast
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressUnavailable(RuntimeError):
    """The egress firewall cannot be installed here; the message says why."""


def _v6_forms(net: ipaddress.IPv4Network) -> list[ipaddress.IPv6Network]:
    """Where ``net`` is reachable through IPv6 translation: NAT64 and 6to4."""
    v4 = int(net.network_address)
    nat64 = ipaddress.IPv6Network((int(_NAT64.network_address) | v4, 96 + net.prefixlen))
    six_to_four = ipaddress.IPv6Network(
        (int(_SIX_TO_FOUR.network_address) | (v4 << 80), 16 + net.prefixlen)
    )
    return [nat64, six_to_four]


def blocked_destinations(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    """The IPv4 and IPv6 networks the chain rejects: the fixed ranges, ``addresses`` (a node's
    own, its gateways, the cluster's nodes, the operator's list: addresses or CIDRs), and the
    IPv6 forms of every IPv4 one; each list collapsed (no network inside another)."""
    v4: list[ipaddress.IPv4Network] = [ipaddress.IPv4Network(n) for n in BLOCKED_V4]
    v6: list[ipaddress.IPv6Network] = [ipaddress.IPv6Network(n) for n in BLOCKED_V6]
    for address in addresses:
        net = ipaddress.ip_network(address.split("%")[0], strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    v4 = list(ipaddress.collapse_addresses(v4))
    for net in v4:
        v6 += _v6_forms(net)
    return (
        [str(n) for n in ipaddress.collapse_addresses(v4)],
        [str(n) for n in ipaddress.collapse_addresses(v6)],
    )


def rules(blocked: Sequence[str]) -> str:
    """The chain, whole, as ``iptables-restore --noflush`` takes it: declaring the chain empties
    it, and the table is committed at once, so no packet sees it half written."""
    lines = ["*filter", f":{CHAIN} - [0:0]"]
    lines += [f"-A {CHAIN} -d {destination} -j REJECT" for destination in blocked]
    return "\n".join([*lines, "COMMIT", ""])


def _ip(*args: str) -> str:
    done = subprocess.run(
        [shutil.which("ip") or "/usr/sbin/ip", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    return done.stdout


def local_addresses() -> list[str]:
    """This node's own addresses (``ip -o addr``), which must be as closed as loopback."""
    addresses = []
    for line in _ip("-o", "addr", "show").splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] in ("inet", "inet6"):
            addresses.append(str(ipaddress.ip_interface(fields[3]).ip))
    return addresses


def gateways() -> list[str]:
    """This node's default gateways (on Hypercore, the host that runs its VM)."""
    found = []
    for family in ("-4", "-6"):
        for line in _ip(family, "route", "show", "default").splitlines():
            fields = line.split()
            if "via" in fields and fields.index("via") + 1 < len(fields):
                found.append(fields[fields.index("via") + 1])
    return found


class EgressFirewall:
    """The egress chain on this node, kept current. Thread-safe; ``ensure`` and ``refresh`` block
    (run them in a thread from an event loop).

    Args:
        blocked: what the operator blocks besides (addresses or CIDRs).
        cluster_addresses: the cluster's node addresses (the replica's Ray call); None: none.
        refresh_s: ``ensure`` reads the addresses again when they are older than this.
    """

    _lock = threading.Lock()  # one writer per process; iptables' own lock orders processes

    def __init__(
        self,
        blocked: Sequence[str] = (),
        cluster_addresses: Callable[[], list[str]] | None = None,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.blocked = tuple(blocked)
        self._cluster_addresses = cluster_addresses
        self.refresh_s = refresh_s
        self._clock = clock
        self._cluster: list[str] = []
        self._written: tuple[list[str], list[str]] | None = None
        self._read_at: float | None = None

    @property
    def installed(self) -> bool:
        return self._written is not None

    def ensure(self) -> None:
        """Installs the chain, or rewrites it when its addresses are stale and changed."""
        with self._lock:
            if self._read_at is not None and self._clock() - self._read_at < self.refresh_s:
                return
            self._write()

    def refresh(self) -> None:
        """Reads the addresses again now and rewrites the chain if they changed (only once it
        was installed: a replica whose tools never used egress leaves the node's rules alone)."""
        with self._lock:
            if self.installed:
                self._write()

    def _write(self) -> None:
        if os.geteuid() != 0:
            raise EgressUnavailable("tool egress needs the replica to run as root")
        for binary in ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "ip"):
            if shutil.which(binary) is None:
                raise EgressUnavailable(f"tool egress needs {binary} on the node")
        if self._cluster_addresses is not None:
            try:
                self._cluster = list(self._cluster_addresses())
            except Exception as e:
                # The node table is the replica's own Ray call: whatever it raises, a chain that
                # was installed keeps its last known nodes, and a first install waits for them.
                if not self.installed:
                    raise EgressUnavailable(f"the cluster's nodes cannot be listed: {e}") from e
                logger.warning("egress firewall: cluster nodes not refreshed (%s)", e)
        try:
            addresses = [*local_addresses(), *gateways(), *self._cluster, *self.blocked]
        except (OSError, subprocess.SubprocessError) as e:
            raise EgressUnavailable(f"the node's addresses cannot be read: {e}") from e
        wanted = blocked_destinations(addresses)
        if wanted != self._written:
            v4, v6 = wanted
            for tool, blocked in (("iptables", v4), ("ip6tables", v6)):
                _restore(tool, rules(blocked))
                owner = ("-m", "owner", "--uid-owner", str(EGRESS_UID), "-j", CHAIN)
                _ensure_rule(tool, "OUTPUT", *owner, first=True)  # before any ACCEPT
            self._written = wanted
        self._read_at = self._clock()


def _run(*argv: str, stdin: str | None = None) -> bool:
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EgressUnavailable(f"{argv[0]} failed: {e}") from e
    return done.returncode == 0


def _restore(tool: str, table: str) -> None:
    if not _run(f"{tool}-restore", "-w", "5", "--noflush", stdin=table):
        raise EgressUnavailable(f"{tool}-restore refused the {CHAIN} chain")


def _ensure_rule(tool: str, chain: str, *rule: str, first: bool = False) -> None:
    add = "-I" if first else "-A"
    if not _run(tool, "-w", "5", "-C", chain, *rule) and not _run(
        tool, "-w", "5", add, chain, *rule
    ):
        raise EgressUnavailable(f"{tool} refused the rule {' '.join(rule)} in {chain}")
