"""What a run reports: the side-by-side comparison and grid tables (markdown), the README table they replace, the
plot (traffic, pods, p99 latency over time), and the recommended setting as Service annotations."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .policies import KPAPolicy
from .search import Objective
from .simulator import SimResult
from .trace import Trace
from .units import fmt_dur, fmt_num


def annotations(p: KPAPolicy) -> dict[str, str]:
    a = {"autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
         "autoscaling.knative.dev/metric": "concurrency"}
    if p.target is not None:
        a["autoscaling.knative.dev/target"] = fmt_num(p.target)
    if p.target_utilization != 0.70:
        a["autoscaling.knative.dev/target-utilization-percentage"] = fmt_num(round(p.target_utilization * 100, 2))
    a["autoscaling.knative.dev/min-scale"] = str(p.min_scale)
    if p.max_scale:
        a["autoscaling.knative.dev/max-scale"] = str(p.max_scale)
    a["autoscaling.knative.dev/initial-scale"] = str(p.initial_scale)
    if p.scale_down_delay:
        a["autoscaling.knative.dev/scale-down-delay"] = fmt_dur(p.scale_down_delay)
    if p.scale_to_zero_pod_retention_period:
        a["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] = fmt_dur(
            p.scale_to_zero_pod_retention_period)
    if p.stable_window != 60:
        a["autoscaling.knative.dev/window"] = fmt_dur(p.stable_window)
    if p.target_burst_capacity != 200:
        a["autoscaling.knative.dev/target-burst-capacity"] = fmt_num(p.target_burst_capacity)
    return a


def service_snippet(p: KPAPolicy) -> str:
    lines = ["spec:", "  template:", "    metadata:", "      annotations:"]
    lines += [f'        {k}: "{v}"' for k, v in annotations(p).items()]
    lines += ["    spec:", f"      containerConcurrency: {p.container_concurrency}"]
    if p.initial_scale == 0:
        lines.append("# initial-scale 0 needs `allow-zero-initial-scale: \"true\"` in config-autoscaler")
    return "\n".join(lines)


def _s(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_table(results: Sequence[SimResult], obj: Objective, settings: Sequence[str] | None = None,
                   revisions: bool = False) -> str:
    heads = [r.name for r in results]
    rows: list[tuple[str, list[str]]] = [
        ("settings", list(settings) if settings else [r.label for r in results]),
        ("requests (ok / failed)", [f"{r.requests} ({r.ok} / {r.failed})" for r in results]),
        ("p50 / p99 TTFT (s)", [f"{_s(r.ttft_p50)} / {_s(r.ttft_p99)}" for r in results]),
        ("p50 / p99 end-to-end (s)", [f"{_s(r.e2e_p50)} / {_s(r.e2e_p99)}" for r in results]),
        ("requests that hit a cold start", [f"{r.cold_start_hits} ({r.arrived_at_zero} at zero pods)"
                                            for r in results]),
        ("503s (activator/queue-proxy)", [str(r.failures.get("503", 0)) for r in results]),
        ("429s (engine queue) / 504s", [f"{r.failures.get('429', 0)} / {r.failures.get('504', 0)}"
                                        for r in results]),
        ("pod cold starts", [str(r.pod_starts) for r in results]),
        *([("revisions created", [str(r.revisions) for r in results])] if revisions else []),
        ("mean / max pods", [f"{r.mean_pods:.2f} / {r.max_pods}" for r in results]),
        ("time in panic mode", [f"{r.panic_ticks * 2 / 3600:.1f} h" if r.name.startswith("KPA") else "-"
                                for r in results]),
        ("GPU-hours", [f"{r.gpu_hours:.1f}" for r in results]),
        (f"cost at ${obj.gpu_hour_price:g}/GPU-hour", [f"${r.cost:,.2f}" for r in results]),
        (f"meets objective ({obj.describe()})", ["yes" if r.meets_slo else "**no**" for r in results]),
    ]
    out = ["| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for name, vals in rows:
        out.append(f"| {name} | " + " | ".join(v.replace("|", "/") for v in vals) + " |")
    return "\n".join(out)


def grid_table(rows: list[dict], obj: Objective, top: int = 8) -> str:
    out = ["| cc | target | min | scale-down-delay | initial | p99 TTFT (s) | p99 E2E (s) | errors | GPU-h | cost | "
           "meets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows[:top]:
        out.append(f"| {s['container_concurrency']} | {fmt_num(s['target'])} | {s['min_scale']} | "
                   f"{fmt_dur(s['scale_down_delay'])} | {s['initial_scale']} | {_s(s['ttft_p99'])} | "
                   f"{_s(s['e2e_p99'])} | {s['error_rate']:.2%} | {s['gpu_hours']:.1f} | ${s['cost']:,.2f} | "
                   f"{'yes' if s['meets_slo'] else 'no'}{' **(recommended)**' if s.get('recommended') else ''} |")
    return "\n".join(out)


def plot(results: Sequence[SimResult], trace: Trace, obj: Objective, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(13, 10), sharex=True, constrained_layout=True)
    hours = trace.horizon / 3600.0
    # traffic
    ax = axes[0]
    minutes = int(math.ceil(trace.horizon / 60.0))
    counts = np.bincount((trace.arrivals // 60).astype(int), minlength=minutes)[:minutes]
    ax.plot(np.arange(minutes) / 60.0, counts / 60.0, lw=0.8, color="0.3", label="arrivals (req/s, 1-min bins)")
    ax.set_ylabel("req/s")
    ref = results[-1]
    if ref.series is not None:
        cum = np.asarray(ref.series["cum"])
        m = (len(cum) - 1) // 60
        if m > 0:
            conc = (cum[60:m * 60 + 1:60] - cum[0:(m - 1) * 60 + 1:60]) / 60.0
            ax2 = ax.twinx()
            ax2.plot(np.arange(m) / 60.0, conc, lw=0.8, color="tab:orange", alpha=0.8,
                     label=f"requests in system ({ref.name})")
            ax2.set_ylabel("concurrency")
            ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(trace.description, fontsize=9)
    # pods
    ax = axes[1]
    for r in results:
        if r.series is None:
            continue
        ax.step(np.asarray(r.series["tick_t"]) / 3600.0, r.series["tick_repl"], where="post", lw=1.0,
                label=f"{r.name}: {r.gpu_hours:.1f} GPU-h")
    ax.set_ylabel("pods (incl. starting)")
    ax.legend(loc="upper left", fontsize=8)
    # latency
    ax = axes[2]
    key = "ttft" if obj.metric == "ttft" else "e2e"
    bin_s = 600.0
    nb = int(math.ceil(trace.horizon / bin_s))
    for r in results:
        if r.series is None:
            continue
        a = r.series["arrival"]
        v = r.series[key]
        ok = r.series["status"] == 200
        b = (a // bin_s).astype(int)
        xs, ys = [], []
        for k in range(nb):
            sel = ok & (b == k)
            xs.append((k + 0.5) * bin_s / 3600.0)
            ys.append(np.percentile(v[sel], 99) if sel.any() else np.nan)   # gaps break the line
        ax.plot(xs, ys, marker=".", lw=0.8, label=r.name)
    ax.axhline(obj.p99_slo, color="red", ls="--", lw=0.8, label=f"objective {obj.p99_slo:g} s")
    ax.set_yscale("log")
    ax.set_ylabel(f"p99 {'TTFT' if key == 'ttft' else 'E2E'} per 10 min (s)")
    ax.set_xlabel("hours")
    ax.set_xlim(0, hours)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_table(text: str) -> tuple[int, int]:
    """(first, last) line index of the planner's comparison table in a markdown text (README.md)."""
    lines = text.splitlines()
    try:
        i = next(k for k, line in enumerate(lines) if line.startswith("| | HPA"))
        j = next(k for k in range(i, len(lines)) if lines[k].startswith("| meets objective"))
    except StopIteration:
        raise ValueError("no planner comparison table ('| | HPA' ... '| meets objective')") from None
    return i, j


def replace_table(text: str, table: str) -> str:
    i, j = comparison_table(text)
    lines = text.splitlines()
    return "\n".join(lines[:i] + table.splitlines() + lines[j + 1:]) + ("\n" if text.endswith("\n") else "")
