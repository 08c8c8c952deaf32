"""The Knative autoscaling planner behind scripts/plan_autoscaling.py: a discrete-event model of Knative's KPA (and,
as a baseline, a Kubernetes HPA on CPU) driven by a measured per-pod capacity curve and a traffic trace.

    capacity.py   the per-pod capacity curve (bench/capacity.json)
    trace.py      traces: read from CSV, or a generated diurnal day
    policies.py   KPA / HPA settings and their controllers (KPADecider, KPAScaler, HPAController)
    schedule.py   scheduled min-scale: CronJobs (k8s/schedule.yaml) and the switches they make
    simulator.py  the discrete-event simulation (metric, activator, queue-proxy, pods)
    search.py     the objective and the grid search for the cheapest setting that meets it
    manifest.py   KPA settings from a Service manifest or a --candidate string
    report.py     markdown tables, the plot, the recommended Service annotations
    units.py      durations and numbers as annotations write them
    cli.py        the command line

What is modelled, and where in Knative Serving it comes from (details and links: docs/autoscaling.md):

* Metric pipeline (pkg/autoscaler/metrics/collector.go, aggregation/bucketing.go): requests in the system
  (buffered in the activator + queued in queue-proxy + in the user container) averaged per 1-second bucket; stable
  and panic windows average these buckets (partial windows after a gap of a whole window, as TimedFloat64Buckets
  does); no data in the stable window means no decision.
* Decider (pkg/autoscaler/scaling/autoscaler.go), every 2 s tick: readyPods = max(1, ready);
  maxScaleUp = ceil(max-scale-up-rate * readyPods); maxScaleDown = floor(readyPods / max-scale-down-rate);
  desiredStable = ceil(stable / target), desiredPanic = ceil(panic / target), each clamped to
  [maxScaleDown, maxScaleUp]; activation-scale floor; panic starts when desiredPanic / readyPods >=
  panic-threshold-percentage / 100, is extended by every such tick and ends on the first tick more than a stable
  window after the last one; in panic the pod count never decreases; scale-down-delay takes the max desired over the
  last ceil(delay / 2 s) ticks. Excess burst capacity = floor(ready * total - target-burst-capacity - panic).
* Target (pkg/reconciler/autoscaling/resources/target.go ResolveMetricTarget): total = containerConcurrency, or
  container-concurrency-target-default (100) when it is 0; the target annotation replaces it (capped by a non-zero
  containerConcurrency); target = total * target-utilization-percentage / 100.
* PA reconciler / scaler (pkg/reconciler/autoscaling/kpa/{kpa,scaler}.go), evaluated every tick: min/max-scale
  bounds (initial-scale raises min until reached); scale to zero only after the PA has been active a stable window,
  then goes inactive, and is scaled to 0 once inactive for max(grace, retention) or, with retention satisfied, once
  the activator has been in the path (SKS proxy mode) for scale-to-zero-grace-period; activation that does not
  succeed within progress-deadline + 10 s scales back to 0. The activator is in the path at zero pods and whenever
  excess burst capacity < 0 (always, with the default target-burst-capacity 200 and GPU-sized concurrency).
* Activator (pkg/activator): buffers requests (queue depth 10000) while no pod has capacity, sends each to a ready
  pod with a free containerConcurrency slot, pokes the autoscaler when a request arrives at zero, returns 503 when
  a request waits longer than the revision timeout or the queue is full.
* Pods: a new pod becomes ready after a cold start drawn from the capacity file; at most containerConcurrency
  requests run in it (queue-proxy queues the rest, depth 10 x cc, 503 beyond); with containerConcurrency 0 the
  engine's own batch (max_num_seqs) and queue (max_queue_size, 429 beyond) apply. A request that starts when the pod
  runs n requests gets TTFT and TPOT drawn from log-normals fitted to the capacity curve's p50/p99 at n; removed pods
  drain their requests. GPU-hours count from pod creation (the GPU is held while loading) to drain.
* HPA baseline (k8s HPA v2 algorithm): CPU utilisation (from the capacity file's cpu_util-vs-concurrency, i.e. a
  modelled proxy: GPU servers keep the CPU mostly idle) every 15 s; desired = ceil(ready * util / target) outside a
  0.1 tolerance, unready pods counted as 0 % on scale-up; scale-down stabilisation window 300 s (max recommendation);
  scale-up limited to max(2x, +4 pods) per 15 s; min/max replicas. Routing as for KPA.
"""
from __future__ import annotations

from .capacity import Z99, Capacity
from .cli import REPO_ROOT, build_parser, main
from .manifest import parse_candidate, policy_from_service
from .policies import ACTIVATING, ACTIVE, INACTIVE, HPAController, HPAPolicy, KPADecider, KPAPolicy, KPAScaler
from .report import (annotations, comparison_table, grid_table, markdown_table, plot, replace_table,
                     service_snippet)
from .schedule import Cron, Schedule, ScheduleEntry, trace_start
from .search import Grid, Objective, search
from .simulator import (EV_DONE, EV_READY, EV_TIMEOUT, INF, ST_RUN, ST_WAIT, ConcurrencyMetric, Pod, SimResult,
                        Simulator, simulate)
from .trace import Trace, generate_diurnal, load_trace, sample_output_tokens
from .units import parse_duration

__all__ = [
    "ACTIVATING", "ACTIVE", "EV_DONE", "EV_READY", "EV_TIMEOUT", "INACTIVE", "INF", "REPO_ROOT", "ST_RUN", "ST_WAIT",
    "Z99", "Capacity", "ConcurrencyMetric", "Cron", "Grid", "HPAController", "HPAPolicy", "KPADecider", "KPAPolicy",
    "KPAScaler", "Objective", "Pod", "Schedule", "ScheduleEntry", "SimResult", "Simulator", "Trace", "annotations",
    "build_parser", "comparison_table", "generate_diurnal", "grid_table", "load_trace", "main", "markdown_table",
    "parse_candidate", "parse_duration", "plot", "policy_from_service", "replace_table", "sample_output_tokens",
    "search", "service_snippet", "simulate", "trace_start",
]
