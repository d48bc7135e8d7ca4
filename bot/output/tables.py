"""ASCII tables exactly as etcd's tools print them (olekukonko/tablewriter with
ALIGN_RIGHT, as etcdctl's and etcdutl's table printers set it). No imports:
the light snapshot-status CLI path uses it too."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.domain.snapshot import SnapshotStatus
from bot.output.units import humanize_bytes


def _centre(text: str, width: int) -> str:
    """tablewriter's Pad: the smaller half of the gap on the left (str.center differs)."""
    gap = width - len(text)
    left = gap // 2
    return " " * left + text + " " * (gap - left) if gap > 0 else text


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Headers centred, every cell right-aligned, no trailing newline."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "|" + "|".join(f" {_centre(h, w)} " for h, w in zip(headers, widths, strict=True)) + "|"
    body = ["|" + "|".join(f" {c.rjust(w)} " for c, w in zip(row, widths, strict=True)) + "|" for row in cells]
    return "\n".join([rule, head, rule, *body, rule])


SNAPSHOT_STATUS_HEADERS = ("HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE")
VERSION_HEADER = "VERSION"  # etcdutl 3.6's fifth column: the file's storage version


def status_table(status: SnapshotStatus) -> str:
    """`etcdutl snapshot status --write-out=table` byte for byte (without the final newline).

    etcdutl v3.5 renders with olekukonko/tablewriter v0.0.5 and
    SetAlignment(ALIGN_RIGHT): headers centred, every cell right-aligned.
    """
    cells = (status.hash_hex, str(status.revision), str(status.total_keys), humanize_bytes(status.total_size))
    if status.storage_version:  # written by etcd 3.6: its etcdutl's table
        return table((*SNAPSHOT_STATUS_HEADERS, VERSION_HEADER), [(*cells, status.storage_version)])
    return table(SNAPSHOT_STATUS_HEADERS, [cells])
