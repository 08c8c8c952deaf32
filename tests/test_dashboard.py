"""The Grafana dashboard (dashboards/autoglm-phone-9b.json) and docs/metrics.md against what the app exports.

Every PromQL expression in the dashboard (panel targets and variable queries) is parsed by a small PromQL parser
below, and each metric name it selects must be a series that `function.metrics.REGISTRY` exports (a family's
samples, with the suffixes prometheus-client adds: `_total`/`_created` for counters, `_bucket`/`_sum`/`_count` for
histograms), unless it is one of the Knative / Kubernetes / Prometheus metrics in EXTERNAL_METRICS. The parser also
checks what a typo would break silently in Grafana (a panel that shows "No data" instead of an error):
unknown functions, `rate()` on a gauge or without a range, label names the selected metric does not have,
`by (...)` labels the aggregated expression does not carry, and variables the dashboard does not define.

The checks are run against deliberately broken copies of the dashboard too (test_checker_rejects_*), so a check
that stopped failing would itself fail.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from function import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "autoglm-phone-9b.json"
DOC = ROOT / "docs" / "metrics.md"

# Metrics the dashboard may use that the app does not export, each with where it comes from. Their labels are not
# checked (they differ between versions of the exporters).
EXTERNAL_METRICS = {
    # Prometheus itself: one series per scrape target (here: per pod scraped by the PodMonitor / scrape job)
    "up": "Prometheus: 1 when the last scrape of the target succeeded",
    # kube-state-metrics
    "kube_pod_info": "kube-state-metrics: one series per pod, Pending ones included",
    # Knative Serving autoscaler, OpenCensus names (Knative <= 1.18), labels namespace_name, service_name, ...
    "autoscaler_desired_pods": "Knative autoscaler (<= 1.18): pods the autoscaler wants",
    "autoscaler_actual_pods": "Knative autoscaler (<= 1.18): pods allocated now",
    "autoscaler_panic_mode": "Knative autoscaler (<= 1.18): 1 in panic mode",
    # Knative Serving autoscaler, OpenTelemetry names (Knative >= 1.19: kn.revision.pods.desired, ...) as the
    # Prometheus exporter writes them; labels k8s_namespace_name, kn_service_name, ...
    "kn_revision_pods_desired": "Knative autoscaler (>= 1.19): pods the autoscaler wants",
    "kn_revision_pods_count": "Knative autoscaler (>= 1.19): pods allocated now",
    "kn_revision_panic_mode": "Knative autoscaler (>= 1.19): 1 in panic mode",
}

# Labels Prometheus attaches to every scraped series: `job`/`instance` always, the others from the PodMonitor /
# ServiceMonitor (Prometheus Operator) or the relabelling of the scrape job in docs/metrics.md.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}

# Grafana's own variables, which it substitutes before sending a query
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
                    "__from", "__to", "__dashboard", "__org", "__user", "__name"}

# What the issue asks the dashboard to show, as the metrics that must appear in it
REQUIRED_METRICS = {
    "http_requests_total",                              # request rate by status
    "autoglm_time_to_first_token_seconds_bucket",       # p50/p99 TTFT
    "autoglm_inter_token_latency_seconds_bucket",       # p50/p99 inter-token latency
    "autoglm_prompt_tokens_total", "autoglm_generation_tokens_total",        # tokens/s in and out
    "autoglm_running_requests", "autoglm_queue_depth",  # batch and queue
    "autoglm_engine_busy_ratio",
    "autoglm_gpu_memory_used_bytes", "autoglm_gpu_memory_reserved_bytes",
    "autoglm_prefix_cache_hit_tokens_total", "autoglm_prefix_cache_queried_tokens_total",
    "autoglm_response_cache_requests_total",            # response-cache hit ratio
    "autoglm_cold_start_phase_seconds",
    "autoglm_model_info",
    "up", "autoscaler_actual_pods", "autoscaler_desired_pods",                # pods
}


# ----------------------------------------------------------------------------------------------- exported metrics
@dataclass
class Exported:
    """Series names the app exports -> their label names, and which of them are counters (rate() is right)."""
    labels: dict[str, set[str]] = field(default_factory=dict)
    counters: set[str] = field(default_factory=set)     # _total, histogram _bucket/_sum/_count
    families: dict[str, str] = field(default_factory=dict)  # family name -> type


def exported_metrics(registry=metrics.REGISTRY) -> Exported:
    """From `registry.collect()`: each family's samples, plus the sample names its type implies (a labelled metric
    that was never used has no samples yet, but Prometheus will see them once it is)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
                "info": ["_info"]}
    # label names of metrics without samples: prometheus-client keeps them on the collector (private, so optional)
    declared: dict[str, tuple[str, ...]] = {}
    for collector, names in getattr(registry, "_collector_to_names", {}).items():
        for n in names:
            declared[n] = tuple(getattr(collector, "_labelnames", ()))
    out = Exported()
    for fam in registry.collect():
        out.families[fam.name] = fam.type
        base = set(declared.get(fam.name, ()))
        for s in fam.samples:
            base |= set(s.labels) - {"le", "quantile"}
        for suffix in suffixes.get(fam.type, [""]):
            name = fam.name + suffix
            out.labels.setdefault(name, set()).update(base | ({"le"} if suffix == "_bucket" else set()))
            if fam.type in ("counter", "histogram", "summary") and suffix in ("_total", "_bucket", "_sum", "_count"):
                out.counters.add(name)
        for s in fam.samples:
            out.labels.setdefault(s.name, set()).update(set(s.labels) | base)
    return out


# ----------------------------------------------------------------------------------------------- PromQL parser
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
AGG_WITH_PARAM = {"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
# functions whose (first, or for quantile_over_time second) argument is a range vector
RANGE_FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "predict_linear",
                   "holt_winters", "double_exponential_smoothing", "absent_over_time", "present_over_time",
                   "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
                   "stddev_over_time", "stdvar_over_time", "last_over_time", "mad_over_time", "quantile_over_time"}
COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}     # meaningless on a gauge
FUNCTIONS = RANGE_FUNCTIONS | {
    "abs", "absent", "ceil", "clamp", "clamp_max", "clamp_min", "day_of_month", "day_of_week", "day_of_year",
    "days_in_month", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "hour", "label_join", "label_replace", "ln", "log2",
    "log10", "minute", "month", "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label",
    "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year", "acos", "acosh", "asin", "asinh", "atan",
    "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "atan2"}
# binary operators by precedence, lowest first (`^` is right-associative)
PRECEDENCE = [{"or"}, {"and", "unless"}, {"==", "!=", "<=", "<", ">=", ">"}, {"+", "-"}, {"*", "/", "%", "atan2"},
              {"^"}]
COMPARISONS = PRECEDENCE[2]

TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+)(?![\w.])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)


class PromQLError(ValueError):
    pass


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]


ANY = None   # label set of an expression whose labels are unknown (an external metric)


class Parser:
    """Recursive descent over PromQL. Produces, per expression: its type (scalar, string, vector, matrix) and the
    label names its series can carry, and records every vector selector and every problem found."""

    def __init__(self, text: str, exported: Exported):
        self.text = text
        self.exported = exported
        self.tokens = self._lex(text)
        self.i = 0
        self.selectors: list[Selector] = []
        self.problems: list[str] = []
        self._selector_end = -1

    @staticmethod
    def _lex(text: str) -> list[tuple[str, str]]:
        out, pos = [], 0
        while pos < len(text):
            m = TOKEN.match(text, pos)
            if not m:
                raise PromQLError(f"unexpected character {text[pos]!r} at {pos}")
            pos = m.end()
            if m.lastgroup != "ws":
                out.append((m.lastgroup, m.group()))
        return out

    # --- token helpers
    def peek(self, k: int = 0) -> tuple[str, str] | None:
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else None

    def at(self, *values: str) -> bool:
        t = self.peek()
        return t is not None and t[1] in values and (t[0] in ("op", "ident"))

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        t = self.peek()
        if t is None or (value is not None and t[1] != value) or (kind is not None and t[0] != kind):
            raise PromQLError(f"expected {value or kind}, got {t[1] if t else 'end of query'!r} in {self.text!r}")
        self.i += 1
        return t[1]

    # --- grammar
    def parse(self) -> tuple[str, set[str] | None]:
        result = self.expr(0)
        if self.peek() is not None:
            raise PromQLError(f"unexpected {self.peek()[1]!r} in {self.text!r}")
        return result

    def expr(self, level: int) -> tuple[str, set[str] | None]:
        if level == len(PRECEDENCE):
            return self.unary()
        left = self.expr(level + 1)
        while self.at(*PRECEDENCE[level]):
            op = self.take()
            if op in COMPARISONS and self.at("bool"):
                self.take()
            matching = None
            if self.at("on", "ignoring"):
                self.take()
                matching = self.label_list()
            if self.at("group_left", "group_right"):
                self.take()
                if self.at("("):
                    self.label_list()
            right = self.expr(level + (0 if op == "^" else 1))
            for side in (left, right):
                if side[0] == "matrix":
                    raise PromQLError(f"range vector used with {op!r} in {self.text!r}")
            labels = _union(left[1], right[1])
            if matching and labels is not ANY and not matching <= labels:
                self.problems.append(f"on/ignoring labels {sorted(matching - labels)} not on either side")
            kind = "vector" if "vector" in (left[0], right[0]) else "scalar"
            left = (kind, labels)
        return left

    def unary(self) -> tuple[str, set[str] | None]:
        if self.at("-", "+"):
            self.take()
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, node: tuple[str, set[str] | None]) -> tuple[str, set[str] | None]:
        while True:
            if self.at("["):
                start = self.i
                self.take("[")
                self.duration()
                if self.at(":"):                       # subquery [range:step]
                    self.take(":")
                    if not self.at("]"):
                        self.duration()
                elif self._selector_end != start:
                    raise PromQLError(f"a range [..] needs a vector selector in {self.text!r}")
                self.take("]")
                if node[0] != "vector":
                    raise PromQLError(f"range applied to a {node[0]} in {self.text!r}")
                node = ("matrix", node[1])
            elif self.at("offset"):
                self.take()
                if self.at("-"):
                    self.take()
                self.duration()
            elif self.at("@"):
                self.take()
                if self.at("start", "end"):
                    self.take()
                    self.take("(")
                    self.take(")")
                else:
                    self.take(kind="number")
            else:
                return node

    def duration(self) -> None:
        t = self.peek()
        if t is None or t[0] not in ("duration", "number"):
            raise PromQLError(f"expected a duration, got {t[1] if t else 'end'!r} in {self.text!r}")
        self.i += 1

    def primary(self) -> tuple[str, set[str] | None]:
        t = self.peek()
        if t is None:
            raise PromQLError(f"unexpected end of {self.text!r}")
        kind, value = t
        if kind == "number":
            self.i += 1
            return ("scalar", set())
        if kind == "string":
            self.i += 1
            return ("string", set())
        if value == "(":
            self.take("(")
            inner = self.expr(0)
            self.take(")")
            return inner
        if value == "{":
            return self.selector(None)
        if kind == "ident" and value.lower() in ("inf", "nan"):
            self.i += 1
            return ("scalar", set())
        if kind == "ident" and value not in KEYWORDS:
            nxt = self.peek(1)
            if value in AGGREGATIONS and nxt is not None and nxt[1] in ("(", "by", "without"):
                return self.aggregation()
            if nxt is not None and nxt[1] == "(":
                return self.call()
            return self.selector(value)
        raise PromQLError(f"unexpected {value!r} in {self.text!r}")

    def label_list(self) -> set[str]:
        self.take("(")
        names = set()
        while not self.at(")"):
            names.add(self.take(kind="ident"))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return names

    def aggregation(self) -> tuple[str, set[str] | None]:
        op = self.take()
        grouping, without = None, False
        if self.at("by", "without"):
            without = self.take() == "without"
            grouping = self.label_list()
        self.take("(")
        extra = set()
        if op in AGG_WITH_PARAM:
            param = self.expr(0)
            if op == "count_values":
                extra = {"<count_values label>"}
            elif param[0] != "scalar":
                raise PromQLError(f"{op} needs a scalar parameter in {self.text!r}")
            self.take(",")
        inner = self.expr(0)
        self.take(")")
        if inner[0] != "vector":
            raise PromQLError(f"{op}() over a {inner[0]} in {self.text!r}")
        if grouping is None and self.at("by", "without"):
            without = self.take() == "without"
            grouping = self.label_list()
        labels = inner[1]
        if grouping is not None and not without and labels is not ANY and not grouping <= labels:
            self.problems.append(f"{op} by {sorted(grouping - labels)}: not labels of {self.text!r}")
        if grouping is None:
            return ("vector", extra)
        if without:
            return ("vector", ANY if labels is ANY else (labels - grouping) | extra)
        return ("vector", grouping | extra)

    def call(self) -> tuple[str, set[str] | None]:
        name = self.take()
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name}() in {self.text!r}")
        self.take("(")
        args, start = [], len(self.selectors)
        while not self.at(")"):
            args.append(self.expr(0))
            if not self.at(")"):
                self.take(",")
        self.take(")")
        range_arg = 1 if name == "quantile_over_time" else 0
        for k, a in enumerate(args):
            wants_matrix = name in RANGE_FUNCTIONS and k == range_arg
            if wants_matrix != (a[0] == "matrix"):
                raise PromQLError(f"{name}() argument {k + 1} must {'' if wants_matrix else 'not '}be a range "
                                  f"vector in {self.text!r}")
        if name in COUNTER_FUNCTIONS:
            for sel in self.selectors[start:]:
                if sel.name in self.exported.labels and sel.name not in self.exported.counters:
                    self.problems.append(f"{name}() of {sel.name}, which is not a counter")
        labels: set[str] | None = set()
        for a in args:
            labels = _union(labels, a[1])
        if name == "histogram_quantile" and labels is not ANY:
            if "le" not in labels:
                self.problems.append(f"histogram_quantile() over series without `le` in {self.text!r}")
            labels = labels - {"le"}
        if name in ("label_replace", "label_join") and labels is not ANY and len(args) > 1:
            labels = labels | {"<new label>"}
        if name in ("time", "pi", "scalar"):
            return ("scalar", set())
        return ("vector", labels)

    def selector(self, name: str | None) -> tuple[str, set[str] | None]:
        if name is not None:
            self.take()
        matchers = []
        if self.at("{"):
            self.take("{")
            while not self.at("}"):
                label = self.take(kind="ident")
                op = self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r} in {self.text!r}")
                value = self.take(kind="string")[1:-1]
                matchers.append((label, op, value))
                if not self.at("}"):
                    self.take(",")
            self.take("}")
        names = [name] if name is not None else []
        for label, op, value in matchers:
            if label == "__name__":
                if op == "=":
                    names.append(value)
                elif op == "=~" and re.fullmatch(r"[a-zA-Z0-9_:|]+", value):
                    names.extend(value.split("|"))
                else:
                    raise PromQLError(f"cannot check the metric names of __name__{op}{value!r}")
        if not names:
            raise PromQLError(f"a selector without a metric name in {self.text!r}")
        labels: set[str] | None = set()
        for n in names:
            self.selectors.append(Selector(n, matchers))
            if n in self.exported.labels:
                own = self.exported.labels[n] | TARGET_LABELS
                unknown = {lab for lab, _, _ in matchers if lab != "__name__"} - own
                if unknown:
                    self.problems.append(f"{n} has no label {sorted(unknown)}")
                labels = _union(labels, own)
            else:
                labels = ANY
        self._selector_end = self.i            # a range [..] may follow right here
        return ("vector", labels)


def _union(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    return ANY if a is ANY or b is ANY else a | b


# ----------------------------------------------------------------------------------------------- dashboard walk
VARIABLE_REF = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+)|\[\[(\w+)\]\])")


def substitute(expr: str) -> str:
    """What Grafana sends: variables replaced (interval variables by a duration, others by a regex-safe value)."""
    expr = re.sub(r"\$\{?(__rate_interval|__interval|__range)\}?", "5m", expr)
    return VARIABLE_REF.sub("x", expr)


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))      # a collapsed row keeps its panels inside
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for p in all_panels(dashboard):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else q
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "", re.S)
            if m:
                out.append((f"variable {v['name']}", f"group by ({m.group(2)}) ({m.group(1)})"))
            elif re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q or ""):
                continue        # label_values(label): every series' values, no metric
            else:
                m = re.fullmatch(r"\s*query_result\((.*)\)\s*", q or "", re.S)
                out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def check_dashboard(dashboard: dict, exported: Exported | None = None) -> list[str]:
    """Every problem found, as readable lines (empty: the dashboard is fine)."""
    exported = exported or exported_metrics()
    problems: list[str] = []

    # structure
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 39:
        problems.append(f"schemaVersion {dashboard.get('schemaVersion')!r} < 39")
    for key in ("title", "uid"):
        if not dashboard.get(key):
            problems.append(f"dashboard has no {key}")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource for prometheus")
    want_ds = {"type": "prometheus", "uid": "${datasource}"}
    for name, v in variables.items():
        if v.get("type") == "query" and v.get("datasource") != want_ds:
            problems.append(f"variable {name} does not query ${{datasource}}")

    ids = []
    boxes = []
    for p in all_panels(dashboard):
        title = p.get("title", "?")
        ids.append(p.get("id"))
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")) or g["x"] + g["w"] > 24 or g["w"] < 1:
            problems.append(f"panel {title!r}: bad gridPos {g}")
        else:
            boxes.append((title, g))
        if p.get("type") == "row":
            continue
        if p.get("datasource") != want_ds:
            problems.append(f"panel {title!r}: datasource {p.get('datasource')} is not {want_ds}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            problems.append(f"panel {title!r}: missing or repeated refId {refs}")
        for t in targets:
            if t.get("datasource") != want_ds:
                problems.append(f"panel {title!r} target {t.get('refId')}: datasource {t.get('datasource')}")
            if not (t.get("expr") or "").strip():
                problems.append(f"panel {title!r} target {t.get('refId')}: empty expr")
    if not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        problems.append(f"panel ids not unique integers: {ids}")
    for k, (t1, a) in enumerate(boxes):
        for t2, b in boxes[k + 1:]:
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and \
                    b["y"] < a["y"] + a["h"]:
                problems.append(f"panels {t1!r} and {t2!r} overlap")

    # queries
    for where, expr in queries(dashboard):
        for m in VARIABLE_REF.finditer(expr):
            ref = next(g for g in m.groups() if g)
            if ref not in variables and ref not in GRAFANA_BUILTINS:
                problems.append(f"{where}: undefined variable ${ref}")
        parser = None
        try:
            parser = Parser(substitute(expr), exported)
            parser.parse()
        except PromQLError as e:
            problems.append(f"{where}: {e}")
        if parser is None:
            continue
        problems.extend(f"{where}: {p}" for p in parser.problems)
        for sel in parser.selectors:
            if sel.name not in exported.labels and sel.name not in EXTERNAL_METRICS:
                problems.append(f"{where}: metric {sel.name} is not exported by the app "
                                f"(nor in the EXTERNAL_METRICS allow-list)")
    return problems


def used_metrics(dashboard: dict) -> set[str]:
    names = set()
    exported = exported_metrics()
    for _, expr in queries(dashboard):
        p = Parser(substitute(expr), exported)
        p.parse()
        names |= {s.name for s in p.selectors}
    return names


# ----------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_valid_and_uses_only_exported_metrics(dashboard):
    problems = check_dashboard(dashboard)
    assert not problems, "\n".join(problems)


def test_dashboard_shows_what_the_issue_asks_for(dashboard):
    missing = REQUIRED_METRICS - used_metrics(dashboard)
    assert not missing, f"no panel uses {sorted(missing)}"


def test_every_external_metric_is_used_and_every_required_app_metric_is_exported(dashboard):
    exported = exported_metrics()
    assert {m for m in REQUIRED_METRICS if m not in EXTERNAL_METRICS} <= set(exported.labels)
    unused = set(EXTERNAL_METRICS) - used_metrics(dashboard)
    assert not unused, f"allow-listed but unused (remove them from EXTERNAL_METRICS): {sorted(unused)}"


def test_exported_names_include_the_client_suffixes():
    e = exported_metrics()
    assert "http_requests_total" in e.counters and "http_requests" not in e.labels
    assert {"route", "method", "status"} <= e.labels["http_requests_total"]
    assert "le" in e.labels["autoglm_time_to_first_token_seconds_bucket"]
    assert "autoglm_queue_depth" in e.labels and "autoglm_queue_depth" not in e.counters


def _mutated(dashboard: dict, old: str, new: str) -> dict:
    text = json.dumps(dashboard)
    assert old in text, old
    return json.loads(text.replace(old, new, 1))


@pytest.mark.parametrize("old, new, expected", [
    ("autoglm_time_to_first_token_seconds_bucket", "autoglm_time_to_first_token_bucket", "not exported"),
    ("autoglm_prompt_tokens_total", "autoglm_prompt_tokens", "not exported"),         # forgot the _total suffix
    ("histogram_quantile(", "histogram_quantle(", "unknown function"),
    ("sum by (status)", "sum by (code)", "not labels of"),
    ("route=~", "path=~", "has no label"),
    ("[$__rate_interval]", "", "range vector"),
    ('"uid": "${datasource}"', '"uid": "prometheus"', "datasource"),
])
def test_checker_rejects_broken_dashboards(dashboard, old, new, expected):
    problems = check_dashboard(_mutated(dashboard, old, new))
    assert any(expected in p for p in problems), problems


def test_checker_rejects_rate_of_a_gauge_and_bad_layout(dashboard):
    broken = copy.deepcopy(dashboard)
    panel = next(p for p in broken["panels"] if p.get("targets"))
    panel["targets"][0]["expr"] = "sum(rate(autoglm_queue_depth[5m]))"
    panel["targets"].append(dict(panel["targets"][0]))                 # a repeated refId
    broken["panels"].append(dict(panel, gridPos=dict(panel["gridPos"])))  # a repeated id, overlapping
    problems = "\n".join(check_dashboard(broken))
    for expected in ("not a counter", "refId", "ids not unique", "overlap"):
        assert expected in problems


@pytest.mark.parametrize("expr", [
    'sum by (route) (rate(http_requests_total{route!="/metrics"}[5m])) / ignoring(route) group_left '
    'sum(rate(http_requests_total[5m]))',
    "histogram_quantile(0.99, sum by (le) (rate(autoglm_time_to_first_token_seconds_bucket[5m] offset 1h)))",
    "max_over_time(autoglm_queue_depth[10m:30s]) > bool 2",
    'count({__name__=~"up|kube_pod_info"}) or vector(0)',
    "-autoglm_engine_busy_ratio ^ 2 ^ 0.5 * 100",
])
def test_parser_accepts_valid_promql(expr):
    p = Parser(expr, exported_metrics())
    p.parse()
    assert not p.problems


@pytest.mark.parametrize("expr", ["sum(rate(http_requests_total[5m])", "rate(http_requests_total[5m]) +",
                                  "http_requests_total{route=}", "sum(http_requests_total[5m])"])
def test_parser_rejects_invalid_promql(expr):
    with pytest.raises(PromQLError):
        Parser(expr, exported_metrics()).parse()


def test_docs_describe_every_exported_metric():
    """docs/metrics.md names each family the registry exports (as its series name) and the KEDA-style query."""
    doc = DOC.read_text()
    suffix = {"counter": "_total", "info": "_info"}
    missing = [fam + suffix.get(kind, "") for fam, kind in exported_metrics().families.items()
               if f"`{fam + suffix.get(kind, '')}" not in doc]
    assert not missing, f"docs/metrics.md does not describe {missing}"
    assert 'sum(rate(http_requests_total{job="autoglm"' in doc
    assert "user-port" in doc and "PodMonitor" in doc
