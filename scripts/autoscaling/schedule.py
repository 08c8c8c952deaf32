"""Scheduled min-scale (k8s/schedule.yaml): CronJobs that patch the revision template's min-scale, their cron
expressions, and the switches they make within a trace."""
from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo


_CRON_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10,
               "nov": 11, "dec": 12, "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
                "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}


class Cron:
    """A standard 5-field cron expression (minute hour day-of-month month day-of-week), as Kubernetes' CronJob
    controller reads it (robfig/cron's standard parser): numbers, names (jan, mon), * (? in the day fields), ranges
    a-b, steps */n, a/n and a-b/n, lists, @daily-style macros; day-of-week 0 and 7 are Sunday; when both day fields are restricted a day matching either one
    fires (the classic cron rule)."""
    _RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))

    def __init__(self, expr: str):
        self.expr = expr
        fields_ = _CRON_MACROS.get(expr.strip(), expr).split()
        if len(fields_) != 5:
            raise ValueError(f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week)")
        fields_ = [("*" if f == "?" and i in (2, 4) else f) for i, f in enumerate(fields_)]
        self.sets = [self._field(f, lo, hi, expr) for f, (lo, hi) in zip(fields_, self._RANGES)]
        if 7 in self.sets[4]:
            self.sets[4] = (self.sets[4] - {7}) | {0}
        self.dom_star, self.dow_star = fields_[2].startswith("*"), fields_[4].startswith("*")

    @staticmethod
    def _field(text: str, lo: int, hi: int, expr: str) -> set[int]:
        def num(v: str) -> int:
            v = v.lower()
            n = _CRON_NAMES[v] if v in _CRON_NAMES else int(v) if v.isdigit() else None
            if n is None or not lo <= n <= hi:
                raise ValueError(f"cron {expr!r}: {v!r} is not in {lo}-{hi}")
            return n

        out: set[int] = set()
        for part in text.split(","):
            rng, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise ValueError(f"cron {expr!r}: bad step in {part!r}")
            if rng == "*":
                a, b = lo, hi
            elif "-" in rng:
                a, b = (num(x) for x in rng.split("-", 1))
                if a > b:
                    raise ValueError(f"cron {expr!r}: range {rng!r} runs backwards")
            else:
                a = num(rng)
                b = hi if step else a
            out.update(range(a, b + 1, int(step) if step else 1))
        return out

    def matches(self, t) -> bool:
        """t: a datetime (wall clock in the CronJob's time zone)."""
        mi, hr, dom, mon, dow = self.sets
        if t.minute not in mi or t.hour not in hr or t.month not in mon:
            return False
        d_ok, w_ok = t.day in dom, (t.isoweekday() % 7) in dow
        if self.dom_star or self.dow_star:
            return d_ok and w_ok
        return d_ok or w_ok


@dataclass
class ScheduleEntry:
    name: str
    cron: Cron
    tz: str
    min_scale: int


@dataclass
class Schedule:
    """min-scale switches at cron times: the CronJobs of k8s/schedule.yaml (or KEY=VALUE text, see parse)."""
    entries: list[ScheduleEntry]
    source: str = ""

    @classmethod
    def load(cls, path: str) -> "Schedule":
        """The CronJobs in a manifest whose container patches autoscaling.knative.dev/min-scale (a JSON merge patch
        passed with -p, as k8s/schedule.yaml does)."""
        import yaml
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
        entries = []
        for d in docs:
            if d.get("kind") != "CronJob":
                continue
            spec = d["spec"]
            pod = spec["jobTemplate"]["spec"]["template"]["spec"]
            for c in pod["containers"]:
                argv = list(c.get("command", [])) + list(c.get("args", []))
                if "-p" not in argv:
                    continue
                patch = json.loads(argv[argv.index("-p") + 1])
                anns = patch.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
                if "autoscaling.knative.dev/min-scale" in anns:
                    entries.append(ScheduleEntry(d["metadata"]["name"], Cron(spec["schedule"]),
                                                 spec.get("timeZone") or "Etc/UTC",
                                                 int(anns["autoscaling.knative.dev/min-scale"])))
        if not entries:
            raise ValueError(f"{path}: no CronJob that patches autoscaling.knative.dev/min-scale")
        return cls(entries, path)

    @property
    def tz(self) -> str:
        return self.entries[0].tz

    def describe(self) -> str:
        return "; ".join(f"min-scale {e.min_scale} at '{e.cron.expr}'" for e in self.entries) + f" ({self.tz})"

    def switches(self, start, horizon: float) -> tuple[int | None, list[tuple[float, int]]]:
        """(min-scale in force at `start`, [(seconds after start, min-scale)] for every firing within the horizon).
        `start`: an aware datetime. Firings are found minute by minute in each CronJob's zone (a CronJob fires at
        most once a minute); the value in force at the start is the last firing in the 8 days before it."""
        out: list[tuple[float, int]] = []
        before: tuple[Any, int] | None = None
        for e in self.entries:
            zone = ZoneInfo(e.tz)
            t0 = start.astimezone(dt.timezone.utc).replace(second=0, microsecond=0)
            for k in range(-8 * 1440, int(math.ceil(horizon / 60.0)) + 1):
                t = t0 + dt.timedelta(minutes=k)
                if not e.cron.matches(t.astimezone(zone)):
                    continue
                rel = (t - start).total_seconds()
                if rel <= 0:
                    if before is None or t > before[0]:
                        before = (t, e.min_scale)
                elif rel <= horizon:
                    out.append((rel, e.min_scale))
        out.sort()
        return (before[1] if before else None), out


def trace_start(text: str | None, sched: Schedule, start_hour: float):
    """The aware datetime of the trace's t=0."""
    if text:
        t = dt.datetime.fromisoformat(text)
        return t if t.tzinfo else t.replace(tzinfo=ZoneInfo(sched.tz))
    return dt.datetime(2026, 1, 5, tzinfo=ZoneInfo(sched.tz)) + dt.timedelta(hours=start_hour)
