"""The vector selectors and grouping labels of a PromQL expression, without a
PromQL parser: enough for the chart's rules and dashboard queries, which
scripts/check_prometheus.py also runs on a real Prometheus (any mistake this
reads past, the real one reports). Standard library only.

    >>> selectors('sum by (kind) (rate(presence_ticks_total{job="p"}[5m])) > 0')
    [Selector(metric='presence_ticks_total', matchers=[('job', '=', 'p')])]
    >>> grouping_labels('sum by (kind) (x) / on (job) group_left y')
    ['kind', 'job']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words that are neither metrics nor followed by "(" as functions are.
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "inf", "nan",
}  # fmt: skip
# Keywords followed by a list of label names.
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]

    def has(self, label: str, op: str, value: str) -> bool:
        return (label, op, value) in self.matchers

    def text(self) -> str:
        inner = ", ".join(f'{label}{op}"{value}"' for label, op, value in self.matchers)
        return f"{self.metric}{{{inner}}}"


def _skip_string(expr: str, i: int) -> int:
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" else 1
    return i + 1


def _closing(expr: str, i: int, open_: str, close: str) -> int:
    """The index just past the bracket that closes the one at i."""
    depth = 0
    while i < len(expr):
        if expr[i] in "\"'":
            i = _skip_string(expr, i)
            continue
        depth += expr[i] == open_
        depth -= expr[i] == close
        i += 1
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {open_!r} in {expr!r}")


def parse_matchers(text: str) -> list[tuple[str, str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = MATCHER.match(text, pos)
        if not m:
            raise ValueError(f"cannot read label matchers {text!r}")
        out.append(m.group(1, 2, 3))
        pos = m.end()
    return out


def _scan(expr: str):
    """Yields ("selector", Selector) and ("labels", [names]) in order."""
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'":
            i = _skip_string(expr, i)
        elif c == "[":
            i = _closing(expr, i, "[", "]")
        elif c == "{":  # a selector without a metric name
            end = _closing(expr, i, "{", "}")
            yield "selector", Selector("", parse_matchers(expr[i + 1 : end - 1]))
            i = end
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            i += 1  # a number (0.5, 1e-3, 0x1f) or a duration (5m)
            while i < n and (expr[i].isalnum() or expr[i] in "._" or (expr[i] in "+-" and expr[i - 1] in "eE")):
                i += 1
        elif IDENT.match(expr, i):
            word = IDENT.match(expr, i).group()
            i += len(word)
            j = i
            while j < n and expr[j].isspace():
                j += 1
            after = expr[j] if j < n else ""
            if word in LABEL_LISTS and after == "(":
                end = _closing(expr, j, "(", ")")
                yield "labels", [w.strip() for w in expr[j + 1 : end - 1].split(",") if w.strip()]
                i = end
            elif after == "(" or word.lower() in KEYWORDS:
                continue  # a function, an aggregation or an operator
            elif after == "{":
                end = _closing(expr, j, "{", "}")
                yield "selector", Selector(word, parse_matchers(expr[j + 1 : end - 1]))
                i = end
            else:
                yield "selector", Selector(word, [])
        else:
            i += 1


def selectors(expr: str) -> list[Selector]:
    return [s for kind, s in _scan(expr) if kind == "selector"]


def grouping_labels(expr: str) -> list[str]:
    """Label names after by, without, on, ignoring, group_left, group_right."""
    return [name for kind, names in _scan(expr) if kind == "labels" for name in names]
