"""``hyperfleet loadtest --workers N``: N load generators as Ray actors, spread over the nodes.

Where one load-generating process saturates (its event loop lags, or it burns a core), the
load runs on Ray, the cluster's own distributed engine, rather than on a home-made one. This
module is the thin shell: every Ray call of the load tester is here; each actor holds one
plain ``Generator`` (``generator.py``) and delegates to it. The split and the merge are plain
functions (``shares.py``).

- Placement: ``scheduling_strategy="SPREAD"`` puts the generators on as many nodes as there
  are (Ray's ``SPREAD`` policy: round robin over the feasible nodes), so N generators get N
  machines' cores and network where the cluster has them. ``num_cpus=0``: the cluster's CPUs
  are declared for agent replicas (the local stack declares more than it has) and may all be
  reserved on a busy cluster; a generator that asked for one would wait, or make the
  autoscaler add a node for the tester. It takes no reservation and shares the node's cores;
  when that starves it, its own lag and CPU warnings say so. A running actor keeps its node
  from scaling down idle: for the length of the run, as it should.
- No restarts (``max_restarts=0``): a restarted generator has lost what it measured, and
  running its users again would count them twice. One that dies is a failure of the run,
  reported with Ray's reason; the others' results are still reported.
- Start: the driver starts every actor and waits until each answers (bounded), sets a
  wall-clock start ``START_LEAD_S`` ahead, and each generator sleeps until then, so their
  times (seconds since each one's start) line up; each reports how late it began and the
  merge moves its times by that much.
- Transfer: a generator's outcomes come back as columns (``columns.py``), not an object
  each. The driver waits for them all in one ``asyncio.wait`` bounded by the plan's worst
  case (``shares.run_bound_s``), and polls the actors' counters for the progress line with
  a short timeout, never asking a generator again before it answered.
- The actors run in the cluster's Python: on a local ``hyperfleet up``, this venv. Each
  imports ``cluster.loadtest`` (and aiohttp) there; a node without them fails the start with
  Ray's import error, before the tenant is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray
from ray._private import services
from ray.exceptions import RayError

from hyperfleet.names import NAMESPACE

from .generator import Counters, Generator, GeneratorResult, Share
from .tenant import SetupError
from .users import Target

# How long the cluster's address may take to accept a connection before the join.
JOIN_PROBE_TIMEOUT_S = 5.0
# From the first actor's creation until every one answers: a node may start a Python for it.
READY_TIMEOUT_S = 120.0
# How far ahead the common start is set, so each generator has its call before then.
START_LEAD_S = 2.0
# How long one progress poll waits for the generators' counters.
COUNTERS_WAIT_S = 0.5
# A running generator whose counters have not answered for this long is hung: stopped, and a
# failure of the run (its event loop answers them between requests, within a second or so).
UNRESPONSIVE_S = 60.0
# How often the run checks its generators' liveness.
LIVENESS_POLL_S = 5.0
ERROR_TEXT_MAX = 600


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
class LoadGenerator:
    """One ``Generator`` in a Ray actor; each method delegates to it. An async actor: the
    counters are read on the generator's own event loop, between its requests."""

    def __init__(self, share: Share) -> None:
        self._generator = Generator(share)

    async def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    async def run(self, target: Target, start_at: float) -> GeneratorResult:
        return await self._generator.run(target, start_at)

    async def counters(self) -> Counters:
        return self._generator.counters()


def _awaitable(ref: Any) -> asyncio.Future[Any]:
    return asyncio.wrap_future(ref.future())


def _check_answers(address: str) -> None:
    """Raise SetupError unless the GCS that ``ray.init(address)`` would dial accepts a
    connection within ``JOIN_PROBE_TIMEOUT_S``: ``ray.init`` retries an address where nothing
    listens for minutes on end (Ray 2.60). The address is found as ``ray.init`` finds it
    (``ray/_private/worker.py`` canonicalizes it first): ``auto`` from ``$RAY_ADDRESS`` or the
    latest head started on this machine, and 127.0.0.1 turned into the machine's address unless
    loopback alone was asked for (``cluster.cli.servers.LOOPBACK_RAY_ENV``)."""
    if address.startswith("ray://"):
        dialled = address.removeprefix("ray://")
    else:
        try:
            dialled = services.canonicalize_bootstrap_address_or_die(address)
        except (ConnectionError, ValueError) as e:
            raise SetupError(f"no Ray cluster at {address} (--ray-address): {_why(e)}") from e
    host, _, port = dialled.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: Ray's to parse, and to refuse
    try:
        with socket.create_connection((host.strip("[]"), int(port)), JOIN_PROBE_TIMEOUT_S):
            return
    except OSError:
        pass
    why = f"nothing answers at {dialled}"
    if dialled != address:
        why += (
            f" (where --ray-address {address} leads; a head that listens on 127.0.0.1 alone "
            "is joined with --ray-address 127.0.0.1:PORT)"
        )
    raise SetupError(f"{why}: no Ray cluster there")


def _why(error: BaseException) -> str:
    """Ray's account of a failure on one line, cut to ``ERROR_TEXT_MAX``."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= ERROR_TEXT_MAX else text[: ERROR_TEXT_MAX - 3] + "..."


class Fleet:
    """The driver's side of a distributed run: its generators' actors. ``start``, then
    ``run`` once, ``poll`` meanwhile; ``stop`` always."""

    def __init__(self, actors: list[Any], joined: bool) -> None:
        self.actors = actors
        self.nodes = [""] * len(actors)
        self._joined = joined  # this process joined the cluster for the run, and leaves it
        self._asked: list[asyncio.Future[Any] | None] = [None] * len(actors)
        self._answered_at = [time.monotonic()] * len(actors)

    @classmethod
    async def start(cls, address: str | None, shares: Sequence[Share]) -> Fleet:
        """Join the cluster at ``address`` (Ray's ``auto`` when None; a process already
        joined stays in its own) and start one generator a share, each answering.

        Raises:
            SetupError: no cluster there, or a generator did not start.
        """
        joined = not ray.is_initialized()
        if joined:
            where = address or "auto"
            _check_answers(where)
            try:
                # Blocks this event loop for the join: nothing else runs on it yet.
                ray.init(address=where, namespace=NAMESPACE, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                raise SetupError(
                    f"cannot join the Ray cluster at {where} (--ray-address): {_why(e)}"
                ) from e
        fleet = cls([LoadGenerator.remote(share) for share in shares], joined)  # type: ignore[attr-defined]
        try:
            ready = asyncio.gather(*(_awaitable(a.node.remote()) for a in fleet.actors))
            fleet.nodes = list(await asyncio.wait_for(ready, READY_TIMEOUT_S))
        except TimeoutError as e:
            fleet.stop()
            raise SetupError(
                f"the {len(shares)} load generators did not all start on the Ray cluster "
                f"within {READY_TIMEOUT_S:g} s"
            ) from e
        except RayError as e:
            fleet.stop()
            raise SetupError(
                f"a load generator could not start on the Ray cluster: {_why(e)} (every "
                "node's Python must import cluster.loadtest and aiohttp: the project "
                "installed there)"
            ) from e
        return fleet

    async def run(self, target: Target, bound_s: float) -> list[GeneratorResult]:
        """Every generator's result, in index order: one that failed, or was still running
        ``bound_s`` after the start (then stopped), as a failure with Ray's reason."""
        start_at = time.time() + START_LEAD_S
        futures = [_awaitable(a.run.remote(target, start_at)) for a in self.actors]
        hung = await self._wait(futures, START_LEAD_S + bound_s)
        results = []
        for index, future in enumerate(futures):
            node = self.nodes[index]
            if index in hung:
                results.append(
                    GeneratorResult.failed(
                        index,
                        f"its counters did not answer for {UNRESPONSIVE_S:.0f} s (hung); stopped",
                        node,
                    )
                )
            elif not future.done():
                future.cancel()
                self._kill(index)
                results.append(
                    GeneratorResult.failed(
                        index,
                        f"still running {bound_s:.0f} s after the start (the plan's worst "
                        "case, every request at its --timeout); stopped",
                        node,
                    )
                )
            elif (error := future.exception()) is not None:
                results.append(GeneratorResult.failed(index, _why(error), node))
            else:
                results.append(replace(future.result(), node=node))
        return results

    async def _wait(self, futures: list[asyncio.Future[Any]], bound_s: float) -> set[int]:
        """Wait for every run until ``bound_s``, asking for counters meanwhile: one that has not
        answered for ``UNRESPONSIVE_S`` is killed. The indices of those killed."""
        self._answered_at = [time.monotonic()] * len(futures)
        deadline = time.monotonic() + bound_s
        hung: set[int] = set()
        pending = set(futures)
        while pending and (left := deadline - time.monotonic()) > 0:
            _, pending = await asyncio.wait(pending, timeout=min(left, LIVENESS_POLL_S))
            if not pending:
                break
            await self.poll()
            now = time.monotonic()
            for index, future in enumerate(futures):
                if future in pending and now - self._answered_at[index] > UNRESPONSIVE_S:
                    hung.add(index)
                    pending.discard(future)
                    future.cancel()
                    self._kill(index)
        return hung

    def _kill(self, index: int) -> None:
        with contextlib.suppress(RayError):  # gone with its node: nothing left to stop
            ray.kill(self.actors[index], no_restart=True)

    async def poll(self) -> list[Counters | None]:
        """Each generator's counters, or None where it has not answered within
        ``COUNTERS_WAIT_S`` (asked again only once it has) or cannot answer."""
        for index, actor in enumerate(self.actors):
            if self._asked[index] is None:
                self._asked[index] = _awaitable(actor.counters.remote())
        await asyncio.wait([f for f in self._asked if f is not None], timeout=COUNTERS_WAIT_S)
        found: list[Counters | None] = []
        for index, future in enumerate(self._asked):
            if future is None or not future.done():
                found.append(None)
                continue
            self._asked[index] = None
            # A generator that died answers with its error; ``run`` reports it.
            if future.exception() is not None:
                found.append(None)
                continue
            self._answered_at[index] = time.monotonic()
            found.append(future.result())
        return found

    def stop(self) -> None:
        """Stop every generator (a finished one holds its node), and leave the cluster if
        this process joined it for the run."""
        for future in self._asked:
            if future is not None:
                future.cancel()
        for actor in self.actors:
            with contextlib.suppress(RayError):  # gone with its node: nothing left to stop
                ray.kill(actor, no_restart=True)
        if self._joined:
            ray.shutdown()
