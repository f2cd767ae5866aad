"""The firewall that lets egress-enabled tools reach the internet but not the platform.

Tools of agents with ``egress: true`` share the node's network namespace, so they run as their
own uid (``EGRESS_UID``) and the node's OUTPUT chain sends that uid's packets through
``HYPERFLEET-EGRESS``, which rejects loopback, this node's own addresses, private, shared and
link-local ranges (where Ray, Redis, the stores, other nodes and cloud metadata live). Everything
else (the internet) passes. The rules match only that uid; they are installed once per node, as
root, and idempotently. Without iptables, or without root, egress tools refuse to run: they never
run unfiltered.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import threading

from .workspace import EGRESS_UID

CHAIN = "HYPERFLEET-EGRESS"
COMMAND_TIMEOUT_S = 10.0
BLOCKED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
)
BLOCKED_V6 = ("::1/128", "fc00::/7", "fe80::/10")


class EgressUnavailable(RuntimeError):
    """The egress firewall cannot be installed here; the message says why."""


def local_addresses() -> list[str]:
    """This node's own addresses (``ip -o addr``), which must be as closed as loopback."""
    found = subprocess.run(
        [shutil.which("ip") or "/usr/sbin/ip", "-o", "addr", "show"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    addresses = []
    for line in found.stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] in ("inet", "inet6"):
            addresses.append(str(ipaddress.ip_interface(fields[3]).ip))
    return addresses


class EgressFirewall:
    _lock = threading.Lock()
    _installed = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            if os.geteuid() != 0:
                raise EgressUnavailable("tool egress needs the replica to run as root")
            for binary in ("iptables", "ip6tables", "ip"):
                if shutil.which(binary) is None:
                    raise EgressUnavailable(f"tool egress needs {binary} on the node")
            own = local_addresses()
            v4 = [*BLOCKED_V4, *(a for a in own if ":" not in a)]
            v6 = [*BLOCKED_V6, *(a for a in own if ":" in a)]
            for tool, blocked in (("iptables", v4), ("ip6tables", v6)):
                _chain(tool, blocked)
            cls._installed = True


def _run(*argv: str) -> bool:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EgressUnavailable(f"{argv[0]} failed: {e}") from e
    return done.returncode == 0


def _ensure_rule(tool: str, chain: str, *rule: str, first: bool = False) -> None:
    add = "-I" if first else "-A"
    if not _run(tool, "-w", "5", "-C", chain, *rule) and not _run(
        tool, "-w", "5", add, chain, *rule
    ):
        raise EgressUnavailable(f"{tool} refused the rule {' '.join(rule)} in {chain}")


def _chain(tool: str, blocked: list[str]) -> None:
    _run(tool, "-w", "5", "-N", CHAIN)  # exists already on a second start: fine
    for destination in blocked:
        _ensure_rule(tool, CHAIN, "-d", destination, "-j", "REJECT")
    owner = ("-m", "owner", "--uid-owner", str(EGRESS_UID), "-j", CHAIN)
    _ensure_rule(tool, "OUTPUT", *owner, first=True)  # before any ACCEPT of the node's own
