"""The entrypoint of a chaos run's stand-in VM images: the workload's process tree in a cgroup of
its own, its connections marked by who opened them, then the node agent.

Why: a stand-in workload has its own 127.88.x.y address for what it serves, but a socket it
opens towards another loopback address leaves from 127.0.0.1 (the kernel's preferred source for
127.0.0.0/8), so no rule on addresses can tell its outbound traffic from anyone else's. A
partition between a worker and the head (``node_faults.partition``) needs that, and iptables
can match a packet's socket by cgroup v2 (``-m cgroup --path``, OUTPUT only). A socket takes the
cgroup of the process that created it and keeps it, so the tree must be in its cgroup before it
opens anything: hence this wrapper, and not a move at partition time. Likewise a connection's
opener is known only at its birth, so a rule installed here marks each connection this workload
opens (``CONNMARK``, a mark derived from its address) for as long as it runs; the partition's
rules drop what either side sends into a connection the other opened.

Both steps are best effort: without a writable cgroup v2 or iptables the node agent still starts,
and a partition falls back to its address rules. Only the standard library is used here, so
the stand-in runs this file as a script (its workloads run in their own home, without the
repository on ``sys.path``).

    python vm_entry.py --cgroup PARENT/NAME --address IP --comment TAG -- ARGV...
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CGROUP2_FALLBACK = Path("/sys/fs/cgroup")
MARK_PREFIX = 0x48460000  # "HF": the upper half; the address's last two octets the lower
MARK_MASK = 0xFFFFFFFF
IPTABLES_WAIT_S = 10
IPTABLES_TIMEOUT_S = 30.0


def cgroup2_root(mounts: str | None = None) -> Path | None:
    """Where cgroup v2 is mounted (``/sys/fs/cgroup/unified`` on a hybrid host), from
    ``/proc/mounts``; None when it is not."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def mark_of(address: str) -> int:
    """The connection mark of a workload's connections: 0x4846 then its address's last two
    octets (unique in the stand-in's 127.88.0.0/16)."""
    packed = ipaddress.IPv4Address(address).packed
    return MARK_PREFIX | (packed[2] << 8) | packed[3]


def iptables() -> str:
    return shutil.which("iptables") or "/usr/sbin/iptables"


def mark_rule(cgroup: str, address: str, comment: str) -> list[str]:
    """The rule (after ``-A``/``-D``) that marks each connection opened from ``cgroup``."""
    return [
        "OUTPUT",
        "-m",
        "cgroup",
        "--path",
        cgroup,
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        "CONNMARK",
        "--set-xmark",
        f"{mark_of(address):#010x}/{MARK_MASK:#010x}",
    ]


def enter_cgroup(cgroup: str, root: Path) -> None:
    """Moves this process into ``root/cgroup`` (made if missing).

    Raises:
        OSError: no such cgroup can be made, or the move was refused.
    """
    path = root / cgroup
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text(f"{os.getpid()}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cgroup", required=True, help="PARENT/NAME below the cgroup v2 root")
    parser.add_argument("--address", required=True, help="the workload's own address")
    parser.add_argument("--comment", required=True, help="tags the marking rule, for cleanup")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    root = cgroup2_root()
    try:
        if root is None:
            raise OSError("no cgroup v2 mounted")
        enter_cgroup(args.cgroup, root)
        subprocess.run(
            [
                iptables(),
                "-w",
                str(IPTABLES_WAIT_S),
                "-A",
                *mark_rule(args.cgroup, args.address, args.comment),
            ],
            check=True,
            capture_output=True,
            timeout=IPTABLES_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as e:
        print(
            f"vm_entry: no cgroup or connection marks ({e}); a partition of this workload "
            "falls back to address rules",
            file=sys.stderr,
            flush=True,
        )
    os.execv(command[0], command)  # noqa: S606 - the image's own entrypoint, as Hypercore runs it
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
