"""Writing a benchmark's section into ``benchmarks/RESULTS.md``: under today's ``## date``
heading, in place of the same section written earlier today, nothing else in the file changed."""

from __future__ import annotations

import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


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
