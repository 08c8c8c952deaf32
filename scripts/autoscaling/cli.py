"""The command line of scripts/plan_autoscaling.py: read the capacity file, the trace and the Service manifest,
simulate the baselines, the candidates and the grid search's recommendation, and report them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .capacity import Capacity
from .manifest import parse_candidate, policy_from_service
from .policies import HPAPolicy, KPAPolicy
from .report import annotations, grid_table, markdown_table, plot, replace_table, service_snippet
from .schedule import Schedule, trace_start
from .search import Grid, Objective, search
from .simulator import SimResult, simulate
from .trace import Trace, generate_diurnal, load_trace

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Simulate Knative KPA (and an HPA baseline) on a traffic trace with a "
                                "measured capacity curve; recommend autoscaling settings.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--capacity", default="bench/capacity.json", help="capacity file (format: docs/autoscaling.md)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help="CSV: arrival seconds[,output tokens]")
    src.add_argument("--generate", choices=["diurnal"], default=None, help="generate a synthetic trace")
    p.add_argument("--hours", type=float, default=24.0, help="length of a generated trace")
    p.add_argument("--peak-rps", type=float, default=1.0, help="daytime peak request rate of a generated trace")
    p.add_argument("--bursts-per-day", type=float, default=6.0)
    p.add_argument("--night-trickle", type=float, default=2.0, help="requests per hour during the idle night")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-trace", help="write the (generated) trace as CSV")
    p.add_argument("--p99-slo", type=float, default=5.0, help="latency objective in seconds")
    p.add_argument("--slo-metric", choices=["ttft", "e2e"], default="ttft")
    p.add_argument("--max-error-rate", type=float, default=0.001, help="allowed fraction of failed requests")
    p.add_argument("--gpu-hour-price", type=float, default=2.5, help="USD per GPU-hour")
    p.add_argument("--max-scale", type=int, default=8, help="max pods (GPUs) for every policy")
    p.add_argument("--service", default=str(REPO_ROOT / "service.yaml"),
                   help="Knative Service manifest: its KPA settings become a column and the base of the search "
                        "('' to skip)")
    p.add_argument("--grid-base", choices=["service", "defaults"], default="service",
                   help="settings the search does not vary (window, utilisation, burst capacity, retention, "
                        "timeout) come from the Service manifest or from Knative's defaults")
    p.add_argument("--container-concurrency", type=int, default=None,
                   help="containerConcurrency of the baseline columns (HPA, KPA with Knative defaults); default: "
                        "the Service manifest's, else 0 (Knative's default, unlimited)")
    p.add_argument("--hpa-cpu-target", type=float, default=70.0, help="HPA CPU utilisation target, percent")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="revision timeoutSeconds (default: the Service manifest's, else 300)")
    p.add_argument("--cc-grid", help="comma-separated containerConcurrency values to search")
    p.add_argument("--target-grid", help="comma-separated target/containerConcurrency fractions to search")
    p.add_argument("--min-scale-grid", help="comma-separated min-scale values to search")
    p.add_argument("--delay-grid", help="comma-separated scale-down-delay seconds to search")
    p.add_argument("--schedule", metavar="MANIFEST",
                   help="CronJobs that patch min-scale (k8s/schedule.yaml): the Service's and the recommended "
                        "setting are also simulated with the schedule, as extra columns")
    p.add_argument("--trace-start", metavar="ISO",
                   help="wall-clock time of the trace's t=0 for --schedule, e.g. 2026-01-05T07:00 (without an offset: "
                        "in the schedule's time zone; default: Monday 2026-01-05, at the generated trace's start hour)")
    p.add_argument("--candidate", action="append", default=[], metavar="KEY=VAL,...",
                   help="also simulate these KPA settings as an extra column, e.g. "
                        "'cc=8,target=6,min-scale=1,scale-down-delay=300' (durations in seconds; repeatable)")
    p.add_argument("--quick", action="store_true", help="small grid and a 3-hour trace (for tests and smoke runs)")
    p.add_argument("--no-search", action="store_true", help="only simulate the baselines")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="processes for the grid search")
    p.add_argument("--json", dest="json_out", help="write all results as JSON")
    p.add_argument("--plot", help="write a PNG: traffic, pods and p99 latency over time")
    p.add_argument("--markdown", help="write the comparison (markdown) to this file")
    p.add_argument("--readme", metavar="README.md",
                   help="replace the comparison table in this file (the lines from '| | HPA' to '| meets objective') "
                        "with this run's")
    return p


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def _csv(text: str | None, typ=float) -> list | None:
    return [typ(x) for x in text.split(",") if x.strip()] if text else None


def _trace(args: argparse.Namespace, cap: Capacity) -> tuple[Trace, float]:
    """The trace (read or generated) and the hour of the day of its t=0."""
    hours = 3.0 if args.quick and args.hours == 24.0 else args.hours
    start_hour = 7.0 if args.quick else 0.0
    if args.trace:
        return load_trace(args.trace, cap, seed=args.seed), 0.0
    return generate_diurnal(cap, hours=hours, peak_rps=args.peak_rps, seed=args.seed,
                            bursts_per_day=args.bursts_per_day, night_trickle_per_hour=args.night_trickle,
                            start_hour=start_hour), start_hour


@dataclasses.dataclass
class _Plan:
    """The columns of a run: the policies, the Service's, the recommendation, the grid and the scheduled twins."""
    scenarios: list[KPAPolicy | HPAPolicy]
    svc_pol: KPAPolicy | None
    svc_note: str
    rec: KPAPolicy | None = None
    grid_rows: list[dict] = dataclasses.field(default_factory=list)
    switches: dict[int, list[tuple[float, int]]] = dataclasses.field(default_factory=dict)   # scenario -> switches
    sched_note: str = ""


def _plan(args: argparse.Namespace, cap: Capacity, trace: Trace, obj: Objective, start_hour: float) -> _Plan:
    svc_pol, svc_note = policy_from_service(args.service) if args.service else (None, "")
    cc = args.container_concurrency
    if cc is None:
        cc = svc_pol.container_concurrency if svc_pol else 0
    timeout = args.request_timeout or (svc_pol.request_timeout if svc_pol else 300.0)
    hpa = HPAPolicy(name="HPA (guide: CPU 70%)", container_concurrency=cc,
                    cpu_target=args.hpa_cpu_target / 100.0, min_replicas=1, max_replicas=args.max_scale,
                    request_timeout=timeout)
    kpa_default = KPAPolicy(name="KPA (Knative defaults)", container_concurrency=cc,
                            max_scale=args.max_scale, request_timeout=timeout)
    plan = _Plan([hpa, kpa_default], svc_pol, svc_note)
    scenarios = plan.scenarios
    if svc_pol is not None:
        if args.request_timeout:
            svc_pol.request_timeout = args.request_timeout
        scenarios.append(svc_pol)
    for k, text in enumerate(args.candidate, 1):
        scenarios.append(parse_candidate(text, kpa_default, f"KPA (candidate {k})"))
    if not args.no_search:
        grid = Grid.default(cap, args.quick)
        grid.container_concurrency = _csv(args.cc_grid, int) or grid.container_concurrency
        grid.target_fraction = _csv(args.target_grid) or grid.target_fraction
        grid.min_scale = _csv(args.min_scale_grid, int) or grid.min_scale
        grid.scale_down_delay = _csv(args.delay_grid) or grid.scale_down_delay
        if svc_pol is not None and args.grid_base == "service":
            base = dataclasses.replace(svc_pol, max_scale=args.max_scale)
        else:
            base = KPAPolicy(max_scale=args.max_scale, request_timeout=timeout)
        plan.rec, plan.grid_rows = search(cap, trace, obj, base, grid, seed=args.seed, jobs=args.jobs)
        scenarios.append(plan.rec)
    if args.schedule:
        sched = Schedule.load(args.schedule)
        t0 = trace_start(args.trace_start, sched, start_hour)
        initial, sw = sched.switches(t0, trace.horizon)
        for pol in list(scenarios):
            if isinstance(pol, KPAPolicy) and (pol is svc_pol or pol is plan.rec or
                                               (svc_pol is None and pol is kpa_default)):
                twin = dataclasses.replace(pol, name=f"{pol.name.removesuffix(')')} + schedule)",
                                           min_scale=pol.min_scale if initial is None else initial)
                plan.switches[len(scenarios)] = sw
                scenarios.append(twin)
        plan.sched_note = (f"Schedule: `{args.schedule}`: {sched.describe()}; trace starts "
                           f"{t0:%a %Y-%m-%d %H:%M %Z}, {len(sw)} switches in it, min-scale "
                           f"{initial if initial is not None else 'unchanged'} at the start")
    return plan


def _report(args: argparse.Namespace, cap: Capacity, trace: Trace, obj: Objective, plan: _Plan,
            results: Sequence[SimResult]) -> str:
    lines = []
    if cap.placeholder:
        lines.append("> **PLACEHOLDER capacity numbers** - " + cap.source)
        lines.append("")
    lines.append(f"Capacity: `{args.capacity}`" + ("" if cap.placeholder else f" ({cap.source})") + "  ")
    if args.service:
        lines.append(f"Service manifest: {plan.svc_note}  ")
    lines.append(f"Trace: {trace.description}  ")
    lines.append(f"Objective: {obj.describe()}; GPU price ${obj.gpu_hour_price:g}/h; max-scale {args.max_scale}"
                 + ("  " if plan.sched_note else ""))
    if plan.sched_note:
        lines.append(plan.sched_note)
    lines.append("")
    lines.append(markdown_table(results, obj, revisions=bool(plan.switches)))
    if plan.rec is not None:
        lines.append("")
        feasible = sum(1 for s in plan.grid_rows if s["meets_slo"])
        lines.append(f"Searched {len(plan.grid_rows)} KPA settings, {feasible} meet the objective. "
                     + ("Recommended (cheapest that meets it):" if results[-1].meets_slo else
                        "**None meets the objective**; closest:"))
        lines.append("")
        lines.append("```yaml")
        lines.append(service_snippet(plan.rec))
        lines.append("```")
        lines.append("")
        lines.append("Best grid points:")
        lines.append("")
        lines.append(grid_table(plan.grid_rows, obj))
    lines.append("")
    lines.append("The HPA column models CPU utilisation from the capacity file's cpu_util-vs-concurrency: on a GPU "
                 "server the CPU mostly waits for the GPU, so CPU is a poor proxy for load.")
    return "\n".join(lines)


def _json_doc(args: argparse.Namespace, cap: Capacity, trace: Trace, obj: Objective, plan: _Plan,
              results: Sequence[SimResult], t_start: float) -> dict:
    rec, switches = plan.rec, plan.switches
    return {
        "capacity": {"path": args.capacity, "source": cap.source, "placeholder": cap.placeholder},
        "trace": {"description": trace.description, "requests": int(len(trace.arrivals)),
                  "horizon_s": trace.horizon},
        "objective": dataclasses.asdict(obj),
        "schedule": ({"path": args.schedule, "note": plan.sched_note} if args.schedule else None),
        "scenarios": [{"policy": dataclasses.asdict(pol), **r.summary(),
                       **({"switches": switches[k]} if k in switches else {})}
                      for k, (pol, r) in enumerate(zip(plan.scenarios, results))],
        "recommendation": ({"policy": dataclasses.asdict(rec), "annotations": annotations(rec),
                            "container_concurrency": rec.container_concurrency} if rec else None),
        "grid": plan.grid_rows,
        "elapsed_s": time.perf_counter() - t_start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    cap = Capacity.load(args.capacity)
    trace, start_hour = _trace(args, cap)
    if args.save_trace:
        trace.save_csv(args.save_trace)
    obj = Objective(args.p99_slo, args.slo_metric, args.max_error_rate, args.gpu_hour_price)
    plan = _plan(args, cap, trace, obj, start_hour)
    results = [obj.judge(simulate(cap, pol, trace, args.seed, record=bool(args.plot),
                                  switches=plan.switches.get(k, ())))
               for k, pol in enumerate(plan.scenarios)]
    report = _report(args, cap, trace, obj, plan, results)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_table(text, markdown_table(results, obj, revisions=bool(plan.switches))))
    if args.plot:
        plot(results, trace, obj, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(_nan_to_none(_json_doc(args, cap, trace, obj, plan, results, t_start)), f, indent=2,
                      default=str)
    print(f"\n({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)
    return 0
