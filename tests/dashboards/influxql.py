"""Just enough InfluxQL to check dashboard queries against ``dcenergy.schema``.

It reads the ``SELECT`` statements the dashboards use (nested subqueries
included) and the ``SHOW TAG VALUES`` of template variables, with Grafana's
variables (``$timeFilter``, ``$host``, ``/^$host$/``) still in place, and says
what is wrong with them: unknown measurements, fields and tags; a field in
``GROUP BY`` (InfluxDB silently groups by an empty tag); a numeric function on
a string field; a missing ``$timeFilter`` or ``host`` filter; an unaliased
computed column; an unanchored variable regex.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dcenergy import schema


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


KEYWORDS = _words(
    "select from where group by fill order limit slimit offset soffset as and or asc desc tz "
    "true false null none previous linear"
)
CLAUSE_END = _words("group order limit slimit offset soffset fill tz")
# Functions that need numbers; last/first/count/distinct/mode/sample also read strings.
NUMERIC_FUNCS = _words(
    "mean median sum integral spread stddev max min percentile derivative "
    "non_negative_derivative difference non_negative_difference moving_average "
    "cumulative_sum elapsed top bottom"
)
SELECTORS = _words("last first max min sample top bottom distinct mode percentile")
BUILTIN_VARS = _words(
    "timeFilter __timeFilter __interval __interval_ms __range __range_s __range_ms "
    "__from __to __dashboard __org __user __name"
)
HOST_FILTER = ("host", "=~", "^$host$")
# What InfluxQL on InfluxDB 3 (Core, Enterprise, Cloud) does not implement: the dashboards
# must work there too (docs-v2, influxql-v3-reference/feature-support.md).
NOT_IN_INFLUXDB3 = _words(
    "integral sample holt_winters holt_winters_with_fit chande_momentum_oscillator "
    "exponential_moving_average double_exponential_moving_average "
    "triple_exponential_moving_average triple_exponential_derivative "
    "relative_strength_index kaufmans_efficiency_ratio kaufmans_adaptive_moving_average "
    "slimit soffset"
)


class ParseError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Tok:
    kind: str  # ident qident string regex number duration var op lparen rparen comma
    text: str

    @property
    def name(self) -> str:
        """An identifier's name, unquoted; a bare keyword lower-cased."""
        if self.kind == "qident":
            return self.text[1:-1].replace('\\"', '"')
        return self.text

    def is_kw(self, *words: str) -> bool:
        return self.kind == "ident" and self.text.lower() in words


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
   |(?P<qident>"(?:[^"\\]|\\.)*")
   |(?P<string>'(?:[^'\\]|\\.)*')
   |(?P<var>\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\])
   |(?P<duration>\d+(?:ns|ms|u|µ|s|m|h|d|w)\b)
   |(?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)
   |(?P<ident>[A-Za-z_]\w*)
   |(?P<op>=~|!~|!=|<>|>=|<=|::|[-+*/%&|^=<>])
   |(?P<lparen>\()|(?P<rparen>\))|(?P<comma>,)
    """,
    re.VERBOSE,
)


def tokenize(q: str) -> list[Tok]:
    toks: list[Tok] = []
    i = 0
    while i < len(q):
        if toks and toks[-1].kind == "op" and toks[-1].text in ("=~", "!~"):
            j = i
            while j < len(q) and q[j].isspace():
                j += 1
            if j < len(q) and q[j] == "/":
                k = j + 1
                while k < len(q) and q[k] != "/":
                    k += 2 if q[k] == "\\" else 1
                if k >= len(q):
                    raise ParseError(f"unterminated regex at {j}: {q[j:]!r}")
                toks.append(Tok("regex", q[j + 1 : k]))
                i = k + 1
                continue
        m = _TOKEN.match(q, i)
        if m is None:
            raise ParseError(f"cannot read {q[i : i + 20]!r} at {i}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            toks.append(Tok(kind, m.group()))
        i = m.end()
    return toks


def var_name(tok_text: str) -> str:
    """``$x``, ``${x}``, ``${x:regex}`` and ``[[x]]`` -> ``x``."""
    return re.sub(r"^\$\{?|\[\[|(?::\w+)?\}$|\]\]$", "", tok_text)


def variables_in(q: str) -> set[str]:
    """Every Grafana variable a query uses, inside regexes too."""
    return {var_name(m.group()) for m in re.finditer(r"\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\]", q)}


@dataclass(slots=True)
class Item:
    expr: list[Tok]
    alias: str | None

    @property
    def name(self) -> str | None:
        """The column this item produces, when it is predictable."""
        if self.alias:
            return self.alias
        if len(self.expr) == 1 and self.expr[0].kind in ("ident", "qident"):
            return self.expr[0].name
        return None


@dataclass(slots=True)
class Select:
    items: list[Item]
    source: str | Select
    where: list[Tok] = field(default_factory=list)
    group_time: str | None = None
    group_tags: list[str] = field(default_factory=list)

    @property
    def measurement(self) -> str:
        return self.source if isinstance(self.source, str) else self.source.measurement

    @property
    def aggregated(self) -> bool:
        return bool(self.group_time or self.group_tags) or any(_calls(i.expr) for i in self.items)


def _calls(expr: list[Tok]) -> list[tuple[str, Tok | None]]:
    """(function, innermost field argument or None) for every call in an expression."""
    out: list[tuple[str, Tok | None]] = []
    for i, t in enumerate(expr):
        if t.kind == "ident" and i + 1 < len(expr) and expr[i + 1].kind == "lparen":
            arg = None
            j = i + 2
            while j < len(expr):
                a = expr[j]
                if a.kind in ("ident", "qident") and not (
                    j + 1 < len(expr) and expr[j + 1].kind == "lparen"
                ):
                    arg = a
                    break
                if a.kind not in ("ident", "lparen"):
                    break
                j += 1
            out.append((t.text.lower(), arg))
    return out


def _refs(expr: list[Tok]) -> list[str]:
    """Identifiers an expression reads (not function names, keywords or literals)."""
    out = []
    for i, t in enumerate(expr):
        if t.kind == "qident" or (t.kind == "ident" and t.text.lower() not in KEYWORDS):
            if t.kind == "ident" and i + 1 < len(expr) and expr[i + 1].kind == "lparen":
                continue
            out.append(t.name)
    return out


class _Parser:
    def __init__(self, toks: list[Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> Tok:
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end of query")
        self.i += 1
        return t

    def expect_kw(self, word: str) -> None:
        t = self.take()
        if not t.is_kw(word):
            raise ParseError(f"expected {word.upper()}, got {t.text!r}")

    def until(self, stop: frozenset[str]) -> list[Tok]:
        """Tokens up to a keyword in ``stop`` or an unmatched ``)``, at depth 0."""
        out: list[Tok] = []
        depth = 0
        while (t := self.peek()) is not None:
            if depth == 0 and (
                t.kind == "rparen" or (t.kind == "ident" and t.text.lower() in stop)
            ):
                break
            depth += (t.kind == "lparen") - (t.kind == "rparen")
            out.append(self.take())
        return out

    def select(self) -> Select:
        self.expect_kw("select")
        items = [_item(part) for part in _split(self.until(frozenset({"from"})))]
        self.expect_kw("from")
        source: str | Select
        if (t := self.peek()) is not None and t.kind == "lparen":
            self.take()
            source = self.select()
            if self.take().kind != "rparen":
                raise ParseError("subquery not closed")
        else:
            src = self.take()
            if src.kind not in ("ident", "qident"):
                raise ParseError(f"expected a measurement, got {src.text!r}")
            source = src.name
        sel = Select(items, source)
        if (t := self.peek()) is not None and t.is_kw("where"):
            self.take()
            sel.where = self.until(CLAUSE_END)
        if (t := self.peek()) is not None and t.is_kw("group"):
            self.take()
            self.expect_kw("by")
            for part in _split(self.until(CLAUSE_END - {"group"})):
                if part and part[0].is_kw("time") and len(part) == 4:
                    sel.group_time = part[2].text
                elif len(part) == 1 and part[0].kind in ("ident", "qident"):
                    sel.group_tags.append(part[0].name)
                else:
                    raise ParseError(f"cannot read GROUP BY item {' '.join(t.text for t in part)}")
        self.until(frozenset())  # fill(), ORDER BY, LIMIT: nothing to check
        return sel


def _split(toks: list[Tok]) -> list[list[Tok]]:
    parts: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        depth += (t.kind == "lparen") - (t.kind == "rparen")
        if t.kind == "comma" and depth == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _item(toks: list[Tok]) -> Item:
    if len(toks) >= 3 and toks[-2].is_kw("as"):
        return Item(toks[:-2], toks[-1].name)
    return Item(toks, None)


def parse(q: str) -> Select:
    p = _Parser(tokenize(q))
    sel = p.select()
    if p.peek() is not None:
        raise ParseError(f"unexpected {p.peek()!r} after the statement")
    return sel


# --- checks ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Scope:
    fields: dict[str, str]  # name -> "num" | "str"
    tags: frozenset[str]


def _scope(sel: Select, problems: list[str]) -> Scope | None:
    if isinstance(sel.source, str):
        m = schema.MEASUREMENTS.get(sel.source)
        if m is None:
            problems.append(f"measurement {sel.source!r} is not in dcenergy.schema")
            return None
        return Scope(
            {f.name: ("str" if f.kind is str else "num") for f in m.fields}, frozenset(m.tags)
        )
    inner = _scope(sel.source, problems)
    _check_select(sel.source, inner, problems)
    if inner is None:
        return None
    out: dict[str, str] = {}
    for it in sel.source.items:
        name = it.name
        if name is None:
            continue
        calls = _calls(it.expr)
        refs = _refs(it.expr)
        kind = "num"
        if (
            len(refs) == 1
            and inner.fields.get(refs[0]) == "str"
            and all(f in SELECTORS for f, _ in calls)
        ):
            kind = "str"
        out[name] = kind
    tags = frozenset(sel.source.group_tags) if sel.source.aggregated else inner.tags
    return Scope(out, tags)


def _check_select(sel: Select, scope: Scope | None, problems: list[str]) -> None:
    where = f"FROM {sel.source!r}" if isinstance(sel.source, str) else "FROM (subquery)"
    if scope is None:
        return
    known = set(scope.fields) | scope.tags | {"time"}
    for it in sel.items:
        for r in _refs(it.expr):
            if r not in known:
                problems.append(f"{where}: selects {r!r}, which it does not have")
        for func, arg in _calls(it.expr):
            if arg is not None and func in NUMERIC_FUNCS and scope.fields.get(arg.name) == "str":
                problems.append(f"{where}: {func}() of string field {arg.name!r}")
        if it.alias is None and it.name is None:
            problems.append(f"{where}: computed column without AS alias")
    for r in _refs(sel.where):
        if r not in known:
            problems.append(f"{where}: WHERE reads {r!r}, which it does not have")
    for tag in sel.group_tags:
        if tag not in scope.tags:
            what = "a field" if tag in scope.fields else "unknown"
            problems.append(f"{where}: GROUP BY {tag!r} is not a tag ({what})")
    if sel.group_time is not None and not re.fullmatch(
        r"\$__interval|\d+(ns|ms|u|s|m|h|d|w)", sel.group_time
    ):
        problems.append(
            f"{where}: GROUP BY time({sel.group_time}) is neither $__interval nor a duration"
        )
    for t in sel.where:
        if t.kind == "regex" and "$" in t.text and not re.fullmatch(r"\^\$\w+\$", t.text):
            problems.append(f"{where}: variable regex /{t.text}/ is not of the form /^$var$/")
    if isinstance(sel.source, str):
        if not any(t.kind == "var" and var_name(t.text) == "timeFilter" for t in sel.where):
            problems.append(f"{where}: no $timeFilter")
        m = schema.MEASUREMENTS[sel.source]
        if "host" in m.tags and not _has_host_filter(sel.where):
            problems.append(f'{where}: no "host" =~ /^$host$/ filter')


def _has_host_filter(where: list[Tok]) -> bool:
    return any(
        (a.name, b.text, c.text) == HOST_FILTER and c.kind == "regex"
        for a, b, c in zip(where, where[1:], where[2:], strict=False)
        if a.kind in ("ident", "qident")
    )


def check_query(q: str) -> list[str]:
    """What is wrong with a dashboard's SELECT (empty when nothing)."""
    try:
        sel = parse(q)
    except ParseError as e:
        return [f"cannot parse: {e}"]
    problems: list[str] = [
        f"{t.text} is not available in InfluxDB 3's InfluxQL"
        for t in tokenize(q)
        if t.kind == "ident" and t.text.lower() in NOT_IN_INFLUXDB3
    ]
    _check_select(sel, _scope(sel, problems), problems)
    return problems


def columns(q: str) -> list[str]:
    """The columns InfluxDB answers a checked SELECT with."""
    sel = parse(q)
    names = [it.name for it in sel.items]
    if None in names:
        raise ValueError(f"unpredictable column in {q!r}")
    return ["time", *(n for n in names if n is not None)]


_SHOW = re.compile(
    r'SHOW TAG VALUES FROM "(?P<m>\w+)" WITH KEY = "(?P<k>\w+)"(?: WHERE (?P<w>.+))?'
)


def check_variable_query(q: str) -> list[str]:
    """What is wrong with a template variable's ``SHOW TAG VALUES`` (empty when nothing)."""
    m = _SHOW.fullmatch(q)
    if m is None:
        return [f'not a SHOW TAG VALUES FROM "m" WITH KEY = "k" [WHERE ...]: {q!r}']
    meas = schema.MEASUREMENTS.get(m["m"])
    if meas is None:
        return [f"measurement {m['m']!r} is not in dcenergy.schema"]
    problems = []
    if m["k"] not in meas.tags:
        problems.append(f"{m['k']!r} is not a tag of {meas.name!r}")
    if m["w"]:
        for r in _refs(tokenize(m["w"])):
            if r not in meas.tags:
                problems.append(f"WHERE reads {r!r}, not a tag of {meas.name!r}")
    return problems
