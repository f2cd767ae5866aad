"""The session's real Ray cluster is up, usable from tests, and reachable on loopback alone."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import ray

from .conftest import RayCluster


def test_session_cluster_runs_tasks(ray_cluster: RayCluster) -> None:
    assert ray_cluster.gcs_port != 6379

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)], timeout=60) == [0, 1, 4, 9]
    assert ray.cluster_resources()["CPU"] >= 1


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of sockets listening on ``port``, from /proc/net/tcp{,6}."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            hex_ip, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(hex_ip)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(ipaddress.ip_address(raw))
    return found


def test_session_cluster_lives_on_loopback(ray_cluster: RayCluster) -> None:
    # Load tests send traffic to this head: it is a loopback node, and its GCS answers no other
    # host (Ray's default would be the machine's interface address, and every interface).
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    addresses = listening_addresses(ray_cluster.gcs_port)
    assert addresses
    for address in addresses:
        mapped = getattr(address, "ipv4_mapped", None) or address
        assert mapped.is_loopback, f"the GCS listens on {address}"
