"""ASCII tables exactly as etcd's tools print them (olekukonko/tablewriter with
ALIGN_RIGHT, as etcdctl's and etcdutl's table printers set it). No imports:
the light snapshot-status CLI path uses it too."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
