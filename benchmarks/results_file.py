"""Writing a benchmark's section into ``benchmarks/RESULTS.md``: under today's ``## date``
heading, in place of the same section written earlier today, nothing else in the file changed;
and the machine and commit a section names."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parent.parent


def machine() -> str:
    """The cores, CPU model, load average and Python a run had."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":")[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    cpu = f"{cpu or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def commit(*paths: str) -> str:
    """HEAD's short hash, "plus uncommitted changes" when ``paths`` have some."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "an unknown commit"
    changed = git("status", "--porcelain", "--", *paths)
    return f"{head} plus uncommitted changes" if changed else head


def write_section(text: str, path: Path = RESULTS, today: str | None = None) -> None:
    """Puts ``text`` (a ``### title`` and its body) at the end of today's ``## date`` section, or
    in place of one with the same title there; a missing heading goes above the newest date."""
    title = text.splitlines()[0]
    today = today or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    lines = path.read_text().splitlines(keepends=True)
    heading = f"## {today}\n"
    if heading not in lines:
        first = next((n for n, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
        lines[first:first] = [heading, "\n"]
    start = lines.index(heading) + 1
    end = next((n for n in range(start, len(lines)) if lines[n].startswith("## ")), len(lines))
    ours = next((n for n in range(start, end) if lines[n].rstrip("\n") == title), None)
    if ours is not None:
        stop = next((n for n in range(ours + 1, end) if lines[n].startswith("### ")), end)
        del lines[ours:stop]
        end -= stop - ours
    at = end
    while at > start and not lines[at - 1].strip():
        at -= 1
    new = ["\n", *text.splitlines(keepends=True)] + (["\n"] if at < len(lines) else [])
    lines[at:end] = new
    path.write_text("".join(lines))
