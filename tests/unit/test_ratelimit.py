"""The control store's moving windows (``MovingWindows``), on a fake clock.

The same rules hold for the Redis script; the admission conformance suite
(``tests/integration/test_admission_conformance.py``) drives both gates through them. These are
the rules the window alone decides, with its memory bound.
"""

from __future__ import annotations

from serve_app import ratelimit
from serve_app.ratelimit import WINDOW_MS, Decision, MovingWindows


class Clock:
    def __init__(self, now_s: float = 1_700_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_a_window_admits_its_limit_in_any_minute_then_says_when_it_has_room() -> None:
    clock = Clock()
    windows = MovingWindows(clock)
    decisions = []
    for _ in range(3):
        decisions.append(windows.hit("k", 3))
        clock.now_s += 10
    assert decisions == [
        Decision(True, 3, 2, 60),
        Decision(True, 3, 1, 50),
        Decision(True, 3, 0, 40),
    ]
    refused = windows.hit("k", 3)  # at 30 s: the first leaves at 60 s
    assert refused == Decision(False, 3, 0, 30)
    assert refused.headers()["Retry-After"] == "30"
    clock.now_s += 29.999
    assert not windows.hit("k", 3).allowed  # the refusal was not recorded...
    clock.now_s += 0.001
    assert windows.hit("k", 3) == Decision(True, 3, 0, 10)  # ...and at 60 s there is room


def test_a_lowered_limit_waits_until_enough_entries_left() -> None:
    clock = Clock()
    windows = MovingWindows(clock)
    for _ in range(5):  # at 0, 10, 20, 30 and 40 s, under a limit of 5
        assert windows.hit("k", 5).allowed
        clock.now_s += 10
    # At 50 s, under a limit of 2: room for one more once four have left, the one from 30 s
    # ago at 90 s; not when the oldest leaves (60 s).
    assert windows.hit("k", 2) == Decision(False, 2, 0, 40)


def test_windows_are_per_key() -> None:
    windows = MovingWindows(Clock())
    assert windows.hit("a", 1).allowed
    assert not windows.hit("a", 1).allowed
    assert windows.hit("b", 1).allowed


def test_windows_with_nothing_left_in_them_are_dropped() -> None:
    clock = Clock()
    windows = MovingWindows(clock)
    for n in range(100):
        windows.hit(f"ip:{n}", 10)
    clock.now_s += WINDOW_MS / 1000
    assert len(windows) == 100
    for _ in range(ratelimit.SWEEP_EVERY - 100):  # the last of these sweeps
        windows.hit("busy", 10**9)
    assert len(windows) == 1  # "busy"
