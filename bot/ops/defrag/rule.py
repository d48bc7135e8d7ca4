"""The rule that picks which members a defragmentation touches (pure).

The language is etcd-defrag's, cut to what a rule needs: the variables

    dbSize        the member's database file, bytes (Status)
    dbSizeInUse   the part of it holding live data, bytes (Status)
    dbSizeFree    dbSize - dbSizeInUse: what a defragmentation gives back
    dbQuota       the member's --quota-backend-bytes (its /metrics; etcd's 2 GiB default when unreadable)
    dbQuotaUsage  dbSize / dbQuota (0.8 is 80 %)

numbers with an optional size unit (B, KB, MB, GB, KiB, MiB, GiB: `200MiB`),
`+ - * /`, comparisons `< <= > >= == !=`, `&&`, `||`, `!` and parentheses.
The default is etcd-defrag's example, `dbQuotaUsage > 0.8 || dbSizeFree > 200MiB`.
A rule that does not parse is refused with one line saying where, and so is
one nested deeper than MAX_DEPTH (parentheses, `!`, `-`, or a chain of one
operator): parsing and evaluating recurse, and a real rule needs a handful.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_RULE = "dbQuotaUsage > 0.8 || dbSizeFree > 200MiB"
MAX_DEPTH = 64   # levels of nesting a rule may have: far more than any rule needs, far below Python's stack
VARIABLES = ("dbSize", "dbSizeInUse", "dbSizeFree", "dbQuota", "dbQuotaUsage")
UNITS = {"B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?P<unit>[A-Za-z]+)?|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op>\|\||&&|<=|>=|==|!=|[-+*/<>!()]))")


class RuleError(ValueError):
    """A rule that does not parse; the message is one line."""


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Unary:
    op: str
    arg: Node


@dataclass(frozen=True)
class Bin:
    op: str
    left: Node
    right: Node


Node = Num | Var | Unary | Bin


@dataclass(frozen=True)
class Rule:
    """A parsed rule: `matches(figures)` says whether a member passes it."""

    text: str
    tree: Node

    def matches(self, figures: Mapping[str, float]) -> bool:
        return bool(_eval(self.tree, figures))


def figures(db_size: int, db_size_in_use: int, quota: int) -> dict[str, float]:
    """The variables for one member."""
    return {"dbSize": db_size, "dbSizeInUse": db_size_in_use, "dbSizeFree": max(db_size - db_size_in_use, 0),
            "dbQuota": quota, "dbQuotaUsage": db_size / quota if quota else 0.0}


def parse_rule(text: str) -> Rule:
    tokens = _tokens(text)
    parser = _Parser(text, tokens)
    tree, _ = parser.expr(0)
    if parser.pos != len(tokens):
        raise RuleError(f"rule: unexpected {tokens[parser.pos].text!r} at column {tokens[parser.pos].col + 1}")
    return Rule(text, tree)


@dataclass(frozen=True)
class _Token:
    kind: str      # num, var, op
    text: str
    col: int
    value: float = 0.0


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    text = text.rstrip()
    if not text:
        raise RuleError("rule: empty; e.g. " + DEFAULT_RULE)
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            col = len(text) - len(text[pos:].lstrip())
            raise RuleError(f"rule: unexpected {text[col]!r} at column {col + 1}")
        start = m.start(m.lastgroup or 0)
        if m["num"] is not None:
            unit = (m["unit"] or "B").upper()
            if unit not in UNITS:
                raise RuleError(f"rule: unknown unit {m['unit']!r} at column {start + 1} (use B, KB, MB, GB, KiB, MiB "
                                "or GiB)")
            out.append(_Token("num", m[0].strip(), start, float(m["num"]) * UNITS[unit]))
        elif m["name"] is not None:
            if m["name"] not in VARIABLES:
                raise RuleError(f"rule: unknown variable {m['name']!r} at column {start + 1} (known: "
                                f"{', '.join(VARIABLES)})")
            out.append(_Token("var", m["name"], start))
        else:
            out.append(_Token("op", m["op"], start))
        pos = m.end()
    return out


# binding power of the binary operators, loosest first
_BINARY = {"||": 1, "&&": 2, "<": 3, "<=": 3, ">": 3, ">=": 3, "==": 3, "!=": 3, "+": 4, "-": 4, "*": 5, "/": 5}


class _Parser:
    """Precedence climbing over the tokens. Each parse returns the node and its depth; `nesting` counts the
    parentheses and prefix operators open (they recurse without adding depth to the tree)."""

    def __init__(self, text: str, tokens: list[_Token]):
        self.text, self.tokens, self.pos, self.nesting = text, tokens, 0, 0

    def _next(self) -> _Token:
        if self.pos >= len(self.tokens):
            raise RuleError(f"rule: ends early (after {self.text.strip()!r})")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _deep(self, depth: int, t: _Token) -> int:
        if depth > MAX_DEPTH or self.nesting > MAX_DEPTH:
            raise RuleError(f"rule: nested deeper than {MAX_DEPTH} levels at column {t.col + 1}")
        return depth

    def atom(self) -> tuple[Node, int]:
        t = self._next()
        if t.kind == "num":
            return Num(t.value), 1
        if t.kind == "var":
            return Var(t.text), 1
        if t.text in ("(", "!", "-"):
            self.nesting += 1
            self._deep(0, t)
            if t.text == "(":
                inner, depth = self.expr(0)
                closing = self._next()
                if closing.text != ")":
                    raise RuleError(f"rule: expected ')' at column {closing.col + 1}")
                node: Node = inner
            else:
                arg, depth = self.atom()
                node, depth = Unary(t.text, arg), self._deep(depth + 1, t)
            self.nesting -= 1
            return node, depth
        raise RuleError(f"rule: unexpected {t.text!r} at column {t.col + 1}")

    def expr(self, floor: int) -> tuple[Node, int]:
        left, depth = self.atom()
        while self.pos < len(self.tokens):
            t = self.tokens[self.pos]
            power = _BINARY.get(t.text, 0) if t.kind == "op" else 0
            if power <= floor:
                break
            self.pos += 1
            self.nesting += 1
            right, right_depth = self.expr(power)
            self.nesting -= 1
            left, depth = Bin(t.text, left, right), self._deep(max(depth, right_depth) + 1, t)
        return left, depth


def _eval(node: Node, env: Mapping[str, float]) -> float:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Var):
        return float(env[node.name])
    if isinstance(node, Unary):
        inner = _eval(node.arg, env)
        return float(not inner) if node.op == "!" else -inner
    x = _eval(node.left, env)
    if node.op == "||":
        return 1.0 if x or _eval(node.right, env) else 0.0
    if node.op == "&&":
        return 1.0 if x and _eval(node.right, env) else 0.0
    y = _eval(node.right, env)
    return float({"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y, "==": x == y, "!=": x != y,
                  "+": x + y, "-": x - y, "*": x * y, "/": x / y if y else 0.0}[node.op])
