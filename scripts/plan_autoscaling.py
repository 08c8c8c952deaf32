#!/usr/bin/env python3
"""Plan Knative autoscaling for the AutoGLM-Phone-9B function: a discrete-event model of Knative's KPA (and, as a
baseline, a Kubernetes HPA on CPU) driven by a measured per-pod capacity curve and a traffic trace.

    python scripts/plan_autoscaling.py --capacity bench/capacity.json --generate diurnal \
        --p99-slo 5 --gpu-hour-price 2.5 --plot out/plan.png --json out/plan.json --markdown out/plan.md

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

import argparse
import csv
import dataclasses
import heapq
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Sequence

import numpy as np

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
Z99 = 2.3263478740408408  # standard normal 99th percentile
INF = float("inf")


# =================================================================================================================
# Capacity file
# =================================================================================================================

def _lognormal(p50: float, p99: float) -> tuple[float, float]:
    p50 = max(float(p50), 1e-9)
    p99 = max(float(p99), p50)
    return math.log(p50), (math.log(p99 / p50) / Z99 if p99 > p50 else 0.0)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(np.interp(x, xs, ys))


@dataclass
class Capacity:
    """Per-pod serving capacity measured at fixed concurrency levels, plus cold-start and workload numbers.
    See bench/capacity.json and docs/autoscaling.md for the file format."""
    concurrency: list[float]
    ttft_p50: list[float]
    ttft_p99: list[float]
    tpot_p50: list[float]
    tpot_p99: list[float]
    tokens_per_s: list[float]
    cpu_util: list[float] | None
    idle_cpu_util: float = 0.02
    cold_start_samples: list[float] | None = None
    cold_start_p50: float = 60.0
    cold_start_p99: float = 120.0
    max_num_seqs: int = 32
    max_queue_size: int = 128
    output_tokens_p50: float = 128.0
    output_tokens_p99: float = 512.0
    max_tokens: int = 1024
    source: str = ""
    placeholder: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Capacity":
        levels = sorted(d["levels"], key=lambda lv: lv["concurrency"])
        if not levels:
            raise ValueError("capacity: 'levels' is empty")
        conc = [float(lv["concurrency"]) for lv in levels]

        def q(lv: dict, key: str, p: str) -> float:
            v = lv[key]
            return float(v[p] if isinstance(v, dict) else v)

        ttft50 = [q(lv, "ttft_s", "p50") for lv in levels]
        ttft99 = [q(lv, "ttft_s", "p99") if isinstance(lv["ttft_s"], dict) else q(lv, "ttft_s", "p50")
                  for lv in levels]
        tpot50, tpot99, tps = [], [], []
        for lv, c in zip(levels, conc):
            if "tpot_s" in lv:
                t50 = q(lv, "tpot_s", "p50")
                t99 = q(lv, "tpot_s", "p99") if isinstance(lv["tpot_s"], dict) else t50
            else:  # derive from aggregate throughput: each of c streams gets tokens_per_s / c
                t50 = t99 = c / float(lv["output_tokens_per_s"])
            tpot50.append(t50)
            tpot99.append(t99)
            tps.append(float(lv.get("output_tokens_per_s", c / t50)))
        cpu = None
        if all("cpu_util" in lv and lv["cpu_util"] is not None for lv in levels):
            cpu = [float(lv["cpu_util"]) for lv in levels]
        cs = d.get("cold_start_s", {})
        if isinstance(cs, (int, float)):
            cs = {"p50": cs, "p99": cs}
        samples = [float(x) for x in cs.get("samples", [])] or None
        if samples:
            p50, p99 = float(np.percentile(samples, 50)), float(np.percentile(samples, 99))
        else:
            p50 = float(cs.get("p50", 60.0))
            p99 = float(cs.get("p99", p50))
        eng = d.get("engine", {})
        wl = d.get("workload", {})
        ot = wl.get("output_tokens", {})
        if isinstance(ot, (int, float)):
            ot = {"p50": ot, "p99": ot}
        return cls(concurrency=conc, ttft_p50=ttft50, ttft_p99=ttft99, tpot_p50=tpot50, tpot_p99=tpot99,
                   tokens_per_s=tps, cpu_util=cpu, idle_cpu_util=float(d.get("idle_cpu_util", 0.02)),
                   cold_start_samples=samples, cold_start_p50=p50, cold_start_p99=p99,
                   max_num_seqs=int(eng.get("max_num_seqs", 32)),
                   max_queue_size=int(eng.get("max_queue_size", 4 * int(eng.get("max_num_seqs", 32)))),
                   output_tokens_p50=float(ot.get("p50", 128)), output_tokens_p99=float(ot.get("p99", 512)),
                   max_tokens=int(wl.get("max_tokens", 1024)), source=str(d.get("source", "")),
                   placeholder=bool(d.get("placeholder", "PLACEHOLDER" in str(d.get("source", "")).upper())))

    @classmethod
    def load(cls, path: str) -> "Capacity":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def latency_table(self, n_max: int) -> list[tuple[float, float, float, float]]:
        """(mu_ttft, sigma_ttft, mu_tpot, sigma_tpot) of the log-normals at each concurrency 0..n_max
        (linear interpolation between levels, held constant outside them)."""
        table = []
        for n in range(n_max + 1):
            x = max(n, 1)
            m1, s1 = _lognormal(_interp(x, self.concurrency, self.ttft_p50), _interp(x, self.concurrency,
                                                                                     self.ttft_p99))
            m2, s2 = _lognormal(_interp(x, self.concurrency, self.tpot_p50), _interp(x, self.concurrency,
                                                                                     self.tpot_p99))
            table.append((m1, s1, m2, s2))
        return table

    def cpu_at(self, n: float) -> float:
        """Modelled CPU utilisation (fraction of the pod's CPU request) at mean concurrency n."""
        if self.cpu_util is None:
            raise ValueError("capacity file has no cpu_util per level: the HPA baseline needs it")
        xs = [0.0] + list(self.concurrency)
        ys = [self.idle_cpu_util] + list(self.cpu_util)
        return _interp(n, xs, ys)

    def sample_cold_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.cold_start_samples:
            return rng.choice(np.asarray(self.cold_start_samples), size=n)
        mu, sig = _lognormal(self.cold_start_p50, self.cold_start_p99)
        return np.exp(mu + sig * rng.standard_normal(n))


# =================================================================================================================
# Policies
# =================================================================================================================

@dataclass
class KPAPolicy:
    """Knative KPA settings: config-autoscaler defaults, overridable per revision by annotations."""
    name: str = "KPA"
    container_concurrency: int = 0             # spec.containerConcurrency (0 = unlimited)
    target: float | None = None                # autoscaling.knative.dev/target
    target_utilization: float = 0.70           # target-utilization-percentage / 100 (container-concurrency-target-percentage)
    container_concurrency_target_default: float = 100.0
    stable_window: float = 60.0                # stable-window / autoscaling.knative.dev/window
    panic_window_percentage: float = 10.0
    panic_threshold_percentage: float = 200.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_to_zero_grace_period: float = 30.0
    scale_to_zero_pod_retention_period: float = 0.0
    scale_down_delay: float = 0.0
    enable_scale_to_zero: bool = True
    min_scale: int = 0
    max_scale: int = 0                         # 0 = unbounded
    initial_scale: int = 1
    activation_scale: int = 1
    target_burst_capacity: float = 200.0       # -1: activator always in path
    tick: float = 2.0
    request_timeout: float = 300.0             # revision timeoutSeconds (activator gives 503 after it)
    activator_queue_depth: int = 10000
    progress_deadline: float = 600.0
    reachable: bool = True

    def resolve_target(self) -> tuple[float, float]:
        """(target, total) as ResolveMetricTarget computes them for the concurrency metric."""
        total = float(self.container_concurrency) or self.container_concurrency_target_default
        if self.target is not None:
            total = float(self.target)
            if self.container_concurrency:
                total = min(total, float(self.container_concurrency))
        return max(0.01, total * self.target_utilization), total

    def label(self) -> str:
        tgt, _ = self.resolve_target()
        parts = [f"cc={self.container_concurrency}",
                 f"target={_fmt_num(self.target) if self.target is not None else 'default'}"
                 f" (eff. {tgt:g})",
                 f"min={self.min_scale}", f"max={self.max_scale or 'inf'}", f"initial={self.initial_scale}",
                 f"scale-down-delay={_fmt_dur(self.scale_down_delay)}"]
        if self.scale_to_zero_pod_retention_period:
            parts.append(f"retention={_fmt_dur(self.scale_to_zero_pod_retention_period)}")
        if self.target_burst_capacity != 200:
            parts.append(f"tbc={_fmt_num(self.target_burst_capacity)}")
        if self.stable_window != 60:
            parts.append(f"window={_fmt_dur(self.stable_window)}")
        return ", ".join(parts)


@dataclass
class HPAPolicy:
    """Kubernetes HPA (autoscaling/v2) on CPU utilisation, default behavior."""
    name: str = "HPA"
    container_concurrency: int = 0
    cpu_target: float = 0.70
    min_replicas: int = 1
    max_replicas: int = 8
    sync_period: float = 15.0
    tolerance: float = 0.10
    scale_down_stabilization: float = 300.0
    scale_up_stabilization: float = 0.0
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4
    target_burst_capacity: float = 200.0       # Knative HPA-class revisions keep the activator rules
    request_timeout: float = 300.0
    activator_queue_depth: int = 10000

    def label(self) -> str:
        return (f"cc={self.container_concurrency}, CPU target {self.cpu_target:.0%}, min={self.min_replicas}, "
                f"max={self.max_replicas}, sync {self.sync_period:g}s, "
                f"down-stabilization {_fmt_dur(self.scale_down_stabilization)}")


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fmt_dur(s: float) -> str:
    s = float(s)
    if s == 0:
        return "0s"
    if s % 3600 == 0:
        return f"{int(s // 3600)}h"
    if s % 60 == 0:
        return f"{int(s // 60)}m"
    return f"{s:g}s"


# =================================================================================================================
# The KPA decider (pkg/autoscaler/scaling/autoscaler.go) and PA scaler (pkg/reconciler/autoscaling/kpa/scaler.go)
# =================================================================================================================

class KPADecider:
    """One revision's autoscaler: `scale(now, stable, panic, ready)` -> (desired pods, excess burst capacity)."""

    def __init__(self, p: KPAPolicy, ready_at_start: int = 0, now: float = 0.0):
        self.p = p
        self.target, self.total = p.resolve_target()
        self.panic_threshold = p.panic_threshold_percentage / 100.0
        # "We always start in the panic mode, if the deployment is scaled up over 1 pod."
        self.panic_time: float | None = now if ready_at_start > 1 else None
        self.max_panic_pods = ready_at_start
        # max.TimeWindow(scale-down-delay, tick): ceil(delay / tick) buckets indexed by now / tick
        self.delay_n = math.ceil(p.scale_down_delay / p.tick) if p.scale_down_delay > 0 else 0
        self.delay: deque = deque()

    @property
    def in_panic(self) -> bool:
        return self.panic_time is not None

    def scale(self, now: float, stable: float, panic: float, ready: int) -> tuple[int, int]:
        p = self.p
        rpc = max(1.0, float(ready))
        max_up = math.ceil(p.max_scale_up_rate * rpc)
        max_down = math.floor(rpc / p.max_scale_down_rate) if p.reachable else 0
        dspc = math.ceil(stable / self.target)
        dppc = math.ceil(panic / self.target)
        dsp = int(min(max(dspc, max_down), max_up))
        dpp = int(min(max(dppc, max_down), max_up))
        if p.activation_scale > 1:
            if dspc > 0 and p.activation_scale > dsp:
                dsp = p.activation_scale
            if dppc > 0 and p.activation_scale > dpp:
                dpp = p.activation_scale
        over = dppc / rpc >= self.panic_threshold
        if over:
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + p.stable_window < now:
            self.panic_time = None
            self.max_panic_pods = 0
        desired = dsp
        if self.panic_time is not None:
            if desired < dpp:
                desired = dpp
            if desired > self.max_panic_pods:
                self.max_panic_pods = desired
            desired = self.max_panic_pods
        if self.delay_n:
            # max over the window as a monotonically decreasing deque (like max.Window): O(1) per tick
            idx = int(now // p.tick)
            dq = self.delay
            while dq and dq[-1][1] <= desired:
                dq.pop()
            if not dq or dq[-1][0] != idx:
                dq.append((idx, desired))
            while dq[0][0] <= idx - self.delay_n:
                dq.popleft()
            desired = dq[0][1]
        if p.target_burst_capacity == 0:
            ebc = 0
        elif p.target_burst_capacity > 0:
            ebc = math.floor(ready * self.total - p.target_burst_capacity - panic)
        else:
            ebc = -1
        return desired, ebc


INACTIVE, ACTIVATING, ACTIVE = "inactive", "activating", "active"


class KPAScaler:
    """The PodAutoscaler reconciler's scale decision: bounds, initial scale, scale-to-zero rules, Active condition
    and SKS mode. `reconcile(now, desired, ebc, ready)` returns the replica count to apply, or None for no change."""

    def __init__(self, p: KPAPolicy, now: float = 0.0):
        self.p = p
        initial = max(p.initial_scale, p.min_scale) if (p.initial_scale > 0 or p.min_scale > 0) else 0
        self.replicas = initial
        self.state = ACTIVATING if initial > 0 else INACTIVE
        self.since = now                         # time of the last Active-condition transition
        self.proxy_since: float | None = now     # SKS in proxy mode since (activator in path)
        self.initialized = p.initial_scale <= 1  # IsScaleTargetInitialized

    def _to_zero(self, now: float, want: int) -> tuple[int, bool]:
        p = self.p
        if want != 0:
            return want, True
        if not p.enable_scale_to_zero:
            return 1, True
        if self.state == ACTIVATING:
            if now - self.since >= p.progress_deadline + 10.0:
                return want, True
            return -1, False
        if self.state == ACTIVE:
            if now - self.since >= p.stable_window:
                return want, False              # mark inactive first
            return 1, True
        inactive_for = now - self.since
        retention = p.scale_to_zero_pod_retention_period
        if inactive_for >= max(p.scale_to_zero_grace_period, retention):
            return want, True
        if retention > 0 and inactive_for < retention:
            return want, False
        proxy_for = now - self.proxy_since if self.proxy_since is not None else 0.0
        if p.scale_to_zero_grace_period - proxy_for <= 0:
            return want, True
        return want, False

    def reconcile(self, now: float, desired: int, ebc: int, ready: int) -> int | None:
        p = self.p
        if desired < 0 and self.state != ACTIVATING:
            apply_to = None
            want = desired
        else:
            lo, hi = p.min_scale, p.max_scale
            if p.initial_scale > 1 and not self.initialized:
                lo = max(lo, p.initial_scale)
            want = desired
            if want < lo:
                want = lo
            if hi and want > hi:
                want = hi
            want, apply = self._to_zero(now, want)
            apply_to = want if apply and want != self.replicas else None
            if apply_to is not None:
                self.replicas = apply_to
        proxy = want == 0 or ebc < 0 or (want == -1 and self.state == INACTIVE) or p.target_burst_capacity == -1
        if proxy and self.proxy_since is None:
            self.proxy_since = now
        elif not proxy:
            self.proxy_since = None
        min_ready = max(1, p.min_scale)
        if want == 0:
            if self.state != INACTIVE:
                self.state, self.since = INACTIVE, now
        elif ready < min_ready:
            if (want > 0 or self.state != INACTIVE) and self.state != ACTIVATING:
                self.state, self.since = ACTIVATING, now
        else:
            if (want > 0 or self.state != INACTIVE) and self.state != ACTIVE:
                self.state, self.since = ACTIVE, now
        if not self.initialized and ready >= p.initial_scale:
            self.initialized = True
        return apply_to

    @property
    def activator_in_path(self) -> bool:
        return self.proxy_since is not None


class HPAController:
    """Kubernetes HPA v2 replica calculation for a CPU Utilization target, default behavior."""

    def __init__(self, p: HPAPolicy):
        self.p = p
        self.replicas = p.min_replicas
        self.history: deque = deque()           # (time, recommendation)

    def recommend(self, ready_utils: Sequence[float], unready: int, current: int) -> int:
        """Replica recommendation before stabilisation (replica_calculator.go GetResourceReplicas)."""
        p = self.p
        if not ready_utils:
            return current
        ratio = (sum(ready_utils) / len(ready_utils)) / p.cpu_target
        if unready == 0 or ratio <= 1.0:
            if abs(ratio - 1.0) <= p.tolerance:
                return current
            return math.ceil(ratio * len(ready_utils))
        new_ratio = sum(ready_utils) / (p.cpu_target * (len(ready_utils) + unready))
        if abs(new_ratio - 1.0) <= p.tolerance or new_ratio < 1.0:
            return current
        new = math.ceil(new_ratio * (len(ready_utils) + unready))
        return current if new < current else new

    def step(self, now: float, ready_utils: Sequence[float], unready: int) -> int:
        p = self.p
        current = self.replicas
        rec = self.recommend(ready_utils, unready, current)
        self.history.append((now, rec))
        horizon = max(p.scale_down_stabilization, p.scale_up_stabilization)
        while self.history and self.history[0][0] < now - horizon:
            self.history.popleft()
        up = min(r for t, r in self.history if t >= now - p.scale_up_stabilization)
        down = max(r for t, r in self.history if t >= now - p.scale_down_stabilization)
        new = current
        if new < up:
            new = up
        if new > down:
            new = down
        if new > current:
            limit = max(math.ceil(current * (1 + p.scale_up_percent / 100.0)), current + p.scale_up_pods)
            new = min(new, limit)
        new = max(p.min_replicas, min(p.max_replicas, new))
        self.replicas = new
        return new


# =================================================================================================================
# Traces
# =================================================================================================================

@dataclass
class Trace:
    arrivals: np.ndarray                 # seconds, sorted
    output_tokens: np.ndarray            # per request
    horizon: float                       # seconds simulated (cost window)
    description: str = ""

    def save_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["arrival_s", "output_tokens"])
            for t, n in zip(self.arrivals.tolist(), self.output_tokens.tolist()):
                w.writerow([f"{t:.3f}", int(n)])


def sample_output_tokens(cap: Capacity, rng: np.random.Generator, n: int) -> np.ndarray:
    mu, sig = _lognormal(cap.output_tokens_p50, cap.output_tokens_p99)
    toks = np.exp(mu + sig * rng.standard_normal(n))
    return np.clip(np.rint(toks), 1, cap.max_tokens).astype(np.int64)


def load_trace(path: str, cap: Capacity, seed: int = 0, horizon: float | None = None) -> Trace:
    """CSV: first column arrival time in seconds (relative, or epoch seconds which are shifted to start at 0),
    optional second column output tokens; a header row is allowed; lines starting with # are skipped."""
    ts, toks = [], []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].lstrip().startswith("#"):
                continue
            try:
                t = float(row[0])
            except ValueError:
                continue  # header
            ts.append(t)
            toks.append(float(row[1]) if len(row) > 1 and row[1].strip() else math.nan)
    if not ts:
        raise ValueError(f"{path}: no arrival times")
    a = np.asarray(ts, dtype=float)
    order = np.argsort(a, kind="stable")
    a = a[order]
    k = np.asarray(toks, dtype=float)[order]
    if a[0] > 365 * 86400:  # epoch timestamps
        a = a - math.floor(a[0])
    rng = np.random.default_rng(seed)
    missing = np.isnan(k)
    if missing.any():
        k[missing] = sample_output_tokens(cap, rng, int(missing.sum()))
    hz = horizon if horizon is not None else float(math.ceil(a[-1] + 1))
    return Trace(a, np.maximum(1, k).astype(np.int64), hz, f"{os.path.basename(path)} ({len(a)} requests)")


def generate_diurnal(cap: Capacity, hours: float = 24.0, peak_rps: float = 1.0, seed: int = 0,
                     bursts_per_day: float = 6.0, night: tuple[float, float] = (1.0, 6.5),
                     night_trickle_per_hour: float = 2.0, start_hour: float = 0.0) -> Trace:
    """A seeded synthetic day: two daytime humps (late morning, evening), quiet early hours with an occasional
    request (idle nights: scale-to-zero territory), plus random bursts of 2-10 minutes at 1-3x the peak rate on top.
    Arrivals are a non-homogeneous Poisson process at 1 s resolution."""
    rng = np.random.default_rng(seed)
    n_sec = int(round(hours * 3600))
    t = np.arange(n_sec) + 0.5
    h = (start_hour + t / 3600.0) % 24.0
    shape = 0.12 + 0.55 * np.exp(-((h - 11.0) / 2.5) ** 2) + 0.5 * np.exp(-((h - 20.5) / 2.0) ** 2)
    quiet = (h >= night[0]) & (h < night[1]) if night[0] <= night[1] else (h >= night[0]) | (h < night[1])
    rise = np.clip((h - night[1]) % 24.0 / 1.5, 0, 1)                   # 1.5 h ramp after the night
    fade_len = 3.0
    d = (h - (night[0] - fade_len)) % 24.0                              # 3 h fade into the night
    fade = np.where(d < fade_len, 1.0 - d / fade_len, 1.0)
    envelope = np.where(quiet, 0.0, np.minimum(rise, fade))
    rate = peak_rps * shape / shape.max() * envelope
    rate = np.where(quiet, night_trickle_per_hour / 3600.0, rate)
    n_b = rng.poisson(bursts_per_day * hours / 24.0)
    daytime = np.flatnonzero(~quiet & (rate > 0.2 * peak_rps))
    for _ in range(n_b if len(daytime) else 0):
        s0 = int(rng.choice(daytime))
        dur = int(rng.uniform(120, 600))
        rate[s0:s0 + dur] += peak_rps * rng.uniform(1.0, 3.0)
    counts = rng.poisson(rate)
    secs = np.repeat(np.arange(n_sec, dtype=float), counts)
    arrivals = np.sort(secs + rng.random(len(secs)))
    toks = sample_output_tokens(cap, rng, len(arrivals))
    return Trace(arrivals, toks, float(n_sec),
                 f"generated diurnal: {hours:g} h, peak {peak_rps:g} req/s, {n_b} bursts, seed {seed} "
                 f"({len(arrivals)} requests)")


# =================================================================================================================
# Scheduled min-scale (k8s/schedule.yaml): CronJobs that patch the revision template's min-scale
# =================================================================================================================

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
        import datetime as dt
        from zoneinfo import ZoneInfo
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


# =================================================================================================================
# Simulation
# =================================================================================================================

class Pod:
    __slots__ = ("id", "created", "ready_at", "state", "active", "queue", "qlive", "area", "last_t", "gone_at")

    def __init__(self, pid: int, created: float, ready_at: float):
        self.id, self.created, self.ready_at = pid, created, ready_at
        self.state = 0            # 0 starting, 1 ready, 2 terminating, 3 gone
        self.active = 0           # requests being generated
        self.queue: deque = deque()
        self.qlive = 0            # live requests in `queue`
        self.area = 0.0           # integral of `active` (for the CPU model)
        self.last_t = created
        self.gone_at = INF


ST_WAIT, ST_RUN = 0, -1
EV_DONE, EV_READY, EV_TIMEOUT = 0, 1, 2


@dataclass
class SimResult:
    name: str
    label: str
    requests: int
    ok: int
    failures: dict[str, int]
    cold_start_hits: int
    arrived_at_zero: int
    ttft_p50: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    gpu_hours: float
    pod_starts: int
    mean_pods: float
    max_pods: int
    panic_ticks: int
    horizon_h: float
    revisions: int = 1                   # revisions created (a scheduled min-scale switch creates one)
    cost: float = 0.0
    meets_slo: bool | None = None
    series: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("series", None)
        d["failed"] = self.failed
        d["error_rate"] = self.error_rate
        return d


class Simulator:
    """Discrete-event simulation of one Service under one autoscaling policy (KPAPolicy or HPAPolicy).

    `switches` [(t, min-scale)] (KPA only, from Schedule.switches) patch the revision template's min-scale at t. As
    in Knative, a changed template is a new revision: it gets a fresh autoscaler and starts max(initial-scale,
    min-scale) pods; the old revision's ready pods keep taking requests until the new revision is ready (that many
    pods ready), then drain and go; its starting pods are dropped. The new revision's autoscaler sees the Service's
    whole concurrency (the requests still on old pods included), a small overestimate during the handover."""

    def __init__(self, cap: Capacity, policy: KPAPolicy | HPAPolicy, trace: Trace, seed: int = 0,
                 record: bool = True, switches: Sequence[tuple[float, int]] = ()):
        self.cap, self.p, self.trace, self.record = cap, policy, trace, record
        self.kpa = isinstance(policy, KPAPolicy)
        if switches and not self.kpa:
            raise ValueError("scheduled min-scale switches apply to the KPA only")
        self.switches = sorted(switches)
        rng = np.random.default_rng(seed)
        n = len(trace.arrivals)
        # per-request randomness drawn up front: the same trace + seed gives every policy the same draws
        self.z1 = rng.standard_normal(n).tolist()
        self.z2 = rng.standard_normal(n).tolist()
        self.cold_iter = 0
        self.cold_pool = cap.sample_cold_starts(np.random.default_rng(seed + 1), 4096).tolist()
        self.route_rng = np.random.default_rng(seed + 2).random(max(n, 1)).tolist()
        cc = policy.container_concurrency
        self.cc = cc
        self.slots = min(cc, cap.max_num_seqs) if cc > 0 else cap.max_num_seqs
        if cc > 0:
            self.qcap = 10 * cc + max(0, cc - cap.max_num_seqs)
            self.overflow_code = 503
        else:
            self.qcap = cap.max_queue_size
            self.overflow_code = 429
        self.lat = cap.latency_table(max(self.slots, 1) + 1)

    # ------------------------------------------------------------------------------------------------------------
    def next_cold_start(self) -> float:
        v = self.cold_pool[self.cold_iter % len(self.cold_pool)]
        self.cold_iter += 1
        return v

    def run(self) -> SimResult:
        p, cap = self.p, self.cap
        arr = self.trace.arrivals.tolist()
        tok = self.trace.output_tokens.tolist()
        N = len(arr)
        H = float(self.trace.horizon)
        z1, z2, lat = self.z1, self.z2, self.lat
        exp = math.exp
        heappush, heappop = heapq.heappush, heapq.heappop

        status = [ST_WAIT] * N
        ttft_l = [math.nan] * N
        e2e_l = [math.nan] * N
        cold = [False] * N
        at_zero = 0
        failures: dict[str, int] = {}
        heap: list = []
        seq = 0

        pods: list[Pod] = []
        ready: list[Pod] = []          # ready, not terminating
        starting: list[Pod] = []
        legacy: list[Pod] = []         # the previous revision's ready pods, serving until the new revision is ready
        handover_n = 0                 # ready pods the new revision needs before the old one's go
        revisions = 1
        act_q: deque = deque()
        act_live = 0
        n_sys = 0
        slots, cc, qcap = self.slots, self.cc, self.qcap
        timeout = p.request_timeout
        route = self.route_rng

        # metric buckets (1 s) and their prefix sums
        cum = [0.0]
        cur_sec = 0
        area = 0.0
        last_t = 0.0
        pods_seen = False
        last_write: int | None = None
        if self.kpa:
            sw = int(round(p.stable_window))
            pw = max(1, int(math.ceil(p.stable_window * p.panic_window_percentage / 100.0)))
        else:
            sw, pw = 60, 6
        first_w = {sw: None, pw: None}

        # series
        tick_t: list[float] = []
        tick_ready: list[int] = []
        tick_repl: list[int] = []
        tick_desired: list[int] = []
        tick_panic: list[bool] = []
        panic_ticks = 0
        pod_starts = 0

        def fail(r: int, code: int, t: float) -> None:
            nonlocal n_sys
            status[r] = code
            e2e_l[r] = t - arr[r]
            key = str(code)
            failures[key] = failures.get(key, 0) + 1
            n_sys -= 1

        def start(r: int, pod: Pod, t: float) -> None:
            nonlocal seq
            n = pod.active + 1
            pod.area += pod.active * (t - pod.last_t)
            pod.last_t = t
            pod.active = n
            m1, s1, m2, s2 = lat[n] if n < len(lat) else lat[-1]
            ttft = exp(m1 + s1 * z1[r])
            done = t + ttft + (tok[r] - 1) * exp(m2 + s2 * z2[r])
            a = arr[r]
            ttft_l[r] = t - a + ttft
            e2e_l[r] = done - a
            if pod.ready_at > a:
                cold[r] = True
            status[r] = ST_RUN
            seq += 1
            heappush(heap, (done, seq, EV_DONE, r, pod))

        def to_pod(r: int, pod: Pod, t: float) -> None:
            nonlocal seq
            if pod.active < slots:
                start(r, pod, t)
            elif pod.qlive < qcap:
                pod.queue.append(r)
                pod.qlive += 1
                seq += 1
                heappush(heap, (arr[r] + timeout, seq, EV_TIMEOUT, r, pod))
            else:
                fail(r, self.overflow_code, t)

        def free_pod() -> Pod | None:
            best = None
            for pd in (ready + legacy if legacy else ready):
                load = pd.active + pd.qlive
                if cc > 0 and load >= cc:
                    continue
                if best is None or load < best.active + best.qlive:
                    best = pd
            return best

        def drain_activator(t: float) -> None:
            nonlocal act_live
            while act_live > 0:
                pod = free_pod()
                if pod is None:
                    return
                while act_q:
                    r = act_q.popleft()
                    if status[r] == ST_WAIT:
                        break
                else:
                    return
                act_live -= 1
                to_pod(r, pod, t)

        def new_pod(t: float) -> None:
            nonlocal seq, pod_starts
            cs = self.next_cold_start()
            pod = Pod(len(pods), t, t + cs)
            pods.append(pod)
            starting.append(pod)
            pod_starts += 1
            seq += 1
            heappush(heap, (t + cs, seq, EV_READY, 0, pod))

        def retire(pod: Pod, t: float) -> None:
            if pod.active == 0 and pod.qlive == 0:
                pod.state = 3
                pod.gone_at = t
            else:
                pod.state = 2

        def set_replicas(t: float, n: int) -> None:
            cur = len(ready) + len(starting)
            while cur < n:
                new_pod(t)
                cur += 1
            while cur > n:
                if starting:
                    pod = starting.pop()      # unready pods go first, newest first
                    pod.state = 3
                    pod.gone_at = t
                else:
                    pod = max(ready, key=lambda x: (x.ready_at, x.id))  # then the most recently ready
                    ready.remove(pod)
                    retire(pod, t)
                cur -= 1

        def finalize_second() -> None:
            nonlocal cur_sec, area, last_t, pods_seen, last_write
            s = cur_sec
            cum.append(cum[-1] + area)
            if area > 0.0 or pods_seen:
                for w in first_w:
                    if first_w[w] is None or last_write is None or s - last_write >= w:
                        first_w[w] = s
                last_write = s
            cur_sec = s + 1
            last_t = float(cur_sec)
            area = 0.0
            pods_seen = bool(ready or legacy)

        def advance(t: float) -> None:
            nonlocal area, last_t, cur_sec
            while t >= cur_sec + 1:
                if n_sys == 0 and not ready and not legacy and not pods_seen and area == 0.0:
                    # idle at zero: jump to the second holding t (no writes, zero buckets)
                    s_to = int(t)
                    if s_to > cur_sec:
                        base = cum[-1]
                        cum.extend([base] * (s_to - cur_sec))
                        cur_sec = s_to
                        last_t = float(s_to)
                    break
                area += n_sys * (cur_sec + 1 - last_t)
                finalize_second()
            area += n_sys * (t - last_t)
            last_t = t

        def window_avg(w: int, now_s: int) -> float | None:
            if last_write is None:
                return None
            d = now_s - last_write
            if d > w:
                return None
            if d == w:
                return 0.0
            lo = max(0, now_s - w + 1)
            total = cum[now_s + 1] - cum[lo]
            nb = last_write - first_w[w] + 1
            nb = min(nb, w if d <= 0 else w - d)
            return round(total / nb, 9) if nb > 0 else 0.0

        # ---- controllers
        desired = -1
        tbc0 = p.target_burst_capacity
        if not self.kpa or tbc0 in (-1, 0):
            ebc = int(tbc0) if self.kpa else -1
        else:  # multiscaler.createScaler: initial EBC assumes one pod
            ebc = int(1 * p.resolve_target()[1] - tbc0)
        max_pods = 0
        rev_policy = p
        if self.kpa:
            decider = KPADecider(p)
            scaler = KPAScaler(p)
            tick = p.tick
            for _ in range(scaler.replicas):
                new_pod(0.0)
            proxy = scaler.activator_in_path
        else:
            hpa = HPAController(p)
            tick = p.sync_period
            for _ in range(hpa.replicas):
                new_pod(0.0)
            proxy = True
            last_sync = 0.0
        max_pods = len(starting)
        tbc = p.target_burst_capacity

        def apply(t: float, n: int) -> None:
            nonlocal max_pods
            set_replicas(t, n)
            if n + len(legacy) > max_pods:
                max_pods = n + len(legacy)

        def kpa_tick(t: float) -> None:
            nonlocal desired, ebc, proxy, panic_ticks
            now_s = cur_sec - 1
            st = window_avg(sw, now_s)
            if st is not None:
                pn = window_avg(pw, now_s) or 0.0
                desired, ebc = decider.scale(t, st, pn, len(ready))
            n = scaler.reconcile(t, desired, ebc, len(ready))
            if n is not None:
                apply(t, n)
            proxy = scaler.activator_in_path
            if decider.in_panic:
                panic_ticks += 1

        def kpa_poke(t: float) -> None:
            """A request reached the activator while the revision is at zero: the activator's stat (its
            concurrency, recorded in the current second) makes the multiscaler tick immediately."""
            nonlocal desired, ebc, proxy
            s = cur_sec
            vals = []
            for w in (sw, pw):
                fresh = last_write is None or s - last_write >= w
                first = s if fresh else first_w[w]
                total = cum[s] - cum[max(0, s - w + 1)] + n_sys
                vals.append(round(total / min(s - first + 1, w), 9))
            desired, ebc = decider.scale(t, vals[0], vals[1], len(ready))
            n = scaler.reconcile(t, desired, ebc, len(ready))
            if n is not None:
                apply(t, n)
            proxy = scaler.activator_in_path

        def hand_over(t: float) -> None:
            nonlocal handover_n
            for pd in legacy:
                retire(pd, t)
            legacy.clear()
            handover_n = 0

        def switch_revision(t: float, min_scale: int) -> None:
            """A patched min-scale: a new revision with its own autoscaler; the old one's pods serve until it is ready."""
            nonlocal decider, scaler, proxy, handover_n, revisions, rev_policy
            if min_scale == rev_policy.min_scale:
                return                        # the same template: Knative creates no revision
            revisions += 1
            rev_policy = dataclasses.replace(rev_policy, min_scale=min_scale)
            for pd in starting:
                pd.state = 3
                pd.gone_at = t
            starting.clear()
            legacy.extend(ready)
            ready.clear()
            decider = KPADecider(rev_policy, now=t)
            scaler = KPAScaler(rev_policy, now=t)
            handover_n = scaler.replicas
            apply(t, scaler.replicas)
            proxy = scaler.activator_in_path
            if handover_n == 0:
                hand_over(t)

        def hpa_tick(t: float) -> None:
            nonlocal last_sync, proxy
            utils = []
            for pd in ready:
                pd.area += pd.active * (t - pd.last_t)
                pd.last_t = t
                since = max(last_sync, pd.ready_at)
                utils.append(cap.cpu_at(pd.area / (t - since)) if t > since else cap.cpu_at(pd.active))
                pd.area = 0.0
            last_sync = t
            n = hpa.step(t, utils, len(starting))
            if n != len(ready) + len(starting):
                apply(t, n)
            # the activator is in the path as for KPA: at zero ready pods, or while burst capacity is short
            cap_total = len(ready) * (cc or 100)
            proxy = (not ready) or tbc == -1 or (tbc > 0 and cap_total - tbc - n_sys < 0)

        # ---- main loop
        i = 0
        next_tick = 0.0
        t = 0.0
        kpa = self.kpa
        record = self.record
        aq_depth = p.activator_queue_depth
        switches = self.switches
        sw_i = 0
        while True:
            t_arr = arr[i] if i < N else INF
            t_ev = heap[0][0] if heap else INF
            if next_tick <= t_arr and next_tick <= t_ev:
                if i >= N and n_sys == 0 and next_tick > H:
                    break
                t = next_tick
                advance(t)
                while sw_i < len(switches) and switches[sw_i][0] <= t:
                    switch_revision(t, switches[sw_i][1])
                    sw_i += 1
                if kpa:
                    kpa_tick(t)
                else:
                    hpa_tick(t)
                if record:
                    tick_t.append(t)
                    tick_ready.append(len(ready))
                    tick_repl.append(len(ready) + len(starting))
                    tick_desired.append(desired if kpa else hpa.replicas)
                    tick_panic.append(decider.in_panic if kpa else False)
                next_tick = t + tick
                continue
            if t_ev <= t_arr:
                t, _, kind, r, pod = heappop(heap)
                advance(t)
                if kind == EV_DONE:
                    status[r] = 200
                    n_sys -= 1
                    pod.area += pod.active * (t - pod.last_t)
                    pod.last_t = t
                    pod.active -= 1
                    while pod.queue and pod.active < slots:
                        r2 = pod.queue.popleft()
                        if status[r2] == ST_WAIT:
                            pod.qlive -= 1
                            start(r2, pod, t)
                    if pod.state == 1:
                        if act_live:
                            drain_activator(t)
                    elif pod.state == 2 and pod.active == 0 and pod.qlive == 0:
                        pod.state = 3
                        pod.gone_at = t
                elif kind == EV_READY:
                    if pod.state == 0:
                        pod.state = 1
                        pod.last_t = t
                        starting.remove(pod)
                        ready.append(pod)
                        pods_seen = True
                        if legacy and len(ready) >= handover_n:
                            hand_over(t)
                        if act_live:
                            drain_activator(t)
                else:  # EV_TIMEOUT
                    if status[r] == ST_WAIT:
                        if pod is None:
                            act_live -= 1
                            fail(r, 503, t)
                        else:
                            pod.qlive -= 1
                            fail(r, 504, t)
                            if pod.state == 2 and pod.active == 0 and pod.qlive == 0:
                                pod.state = 3
                                pod.gone_at = t
                continue
            # an arrival
            t = t_arr
            r = i
            i += 1
            advance(t)
            n_sys += 1
            serving = ready + legacy if legacy else ready
            if not serving:
                at_zero += 1
            if proxy or not serving:
                if act_live == 0:
                    pod = free_pod()
                    if pod is not None:
                        to_pod(r, pod, t)
                        continue
                if act_live >= aq_depth:
                    fail(r, 503, t)
                    continue
                act_q.append(r)
                act_live += 1
                seq += 1
                heappush(heap, (arr[r] + timeout, seq, EV_TIMEOUT, r, None))
                if kpa and desired == 0 and not serving and not starting:
                    kpa_poke(t)
            else:
                to_pod(r, serving[int(route[r] * len(serving))], t)

        self.revisions = revisions
        return self._result(status, ttft_l, e2e_l, cold, at_zero, failures, pods, H, pod_starts, panic_ticks,
                            max_pods, dict(tick_t=tick_t, tick_ready=tick_ready, tick_repl=tick_repl,
                                 tick_desired=tick_desired, tick_panic=tick_panic, cum=cum) if self.record else None)

    # ------------------------------------------------------------------------------------------------------------
    def _result(self, status, ttft_l, e2e_l, cold, at_zero, failures, pods, H, pod_starts, panic_ticks,
                max_pods, series):
        st = np.asarray(status)
        okm = st == 200
        ttft = np.asarray(ttft_l)[okm]
        e2e = np.asarray(e2e_l)[okm]
        gpu_s = sum(max(0.0, min(pd.gone_at, H) - pd.created) for pd in pods if pd.created < H)

        def pct(a, q):
            return float(np.percentile(a, q)) if len(a) else math.nan

        mean_pods = gpu_s / H if H > 0 else 0.0
        res = SimResult(name=self.p.name, label=self.p.label(), requests=len(st), ok=int(okm.sum()),
                        failures=dict(sorted(failures.items())), cold_start_hits=int(np.asarray(cold).sum()),
                        arrived_at_zero=at_zero, ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99),
                        e2e_p50=pct(e2e, 50), e2e_p99=pct(e2e, 99), gpu_hours=gpu_s / 3600.0,
                        pod_starts=pod_starts, mean_pods=mean_pods,
                        max_pods=max_pods,
                        panic_ticks=panic_ticks, horizon_h=H / 3600.0, revisions=self.revisions)
        if series is not None:
            series["arrival"] = self.trace.arrivals
            series["status"] = st
            series["ttft"] = np.asarray(ttft_l)
            series["e2e"] = np.asarray(e2e_l)
            series["cold"] = np.asarray(cold)
            res.series = series
        return res


def simulate(cap: Capacity, policy: KPAPolicy | HPAPolicy, trace: Trace, seed: int = 0,
             record: bool = False, switches: Sequence[tuple[float, int]] = ()) -> SimResult:
    return Simulator(cap, policy, trace, seed=seed, record=record, switches=switches).run()


# =================================================================================================================
# Evaluation, grid search, recommendation
# =================================================================================================================

@dataclass
class Objective:
    p99_slo: float = 5.0                 # seconds
    metric: str = "ttft"                 # "ttft" or "e2e"
    max_error_rate: float = 0.001        # failed (503/504/429) / requests
    gpu_hour_price: float = 2.5

    def p99(self, r: SimResult) -> float:
        return r.ttft_p99 if self.metric == "ttft" else r.e2e_p99

    def judge(self, r: SimResult) -> SimResult:
        r.cost = r.gpu_hours * self.gpu_hour_price
        p99 = self.p99(r)
        r.meets_slo = bool(not math.isnan(p99) and p99 <= self.p99_slo and r.error_rate <= self.max_error_rate)
        return r

    def describe(self) -> str:
        return (f"p99 {'TTFT' if self.metric == 'ttft' else 'end-to-end latency'} <= {self.p99_slo:g} s and "
                f"errors <= {self.max_error_rate:.2%}")


@dataclass
class Grid:
    container_concurrency: list[int]
    target_fraction: list[float]         # target annotation = fraction * containerConcurrency
    min_scale: list[int]
    scale_down_delay: list[float]
    initial_scale: list[int]

    @classmethod
    def default(cls, cap: Capacity, quick: bool = False) -> "Grid":
        ccs = [c for c in ((8, 16) if quick else (4, 8, 16, 32)) if c <= cap.max_num_seqs] or [cap.max_num_seqs]
        if quick:
            return cls(ccs, [0.75, 1.0], [0, 1], [0, 600], [1, 0])
        return cls(ccs, [0.5, 0.75, 1.0], [0, 1], [0, 300, 900, 1800], [1, 0, 2])

    def policies(self, base: KPAPolicy) -> list[KPAPolicy]:
        out, seen = [], set()
        for cc, frac, mn, sdd in product(self.container_concurrency, self.target_fraction, self.min_scale,
                                         self.scale_down_delay):
            tgt = max(1, int(round(cc * frac)))
            key = (cc, tgt, mn, sdd)
            if key in seen:
                continue
            seen.add(key)
            out.append(dataclasses.replace(base, name="KPA (candidate)", container_concurrency=cc,
                                           target=float(tgt), min_scale=mn, scale_down_delay=float(sdd),
                                           initial_scale=self.initial_scale[0]))
        return out


_G: dict[str, Any] = {}


def _pool_init(cap: Capacity, trace: Trace, seed: int) -> None:
    _G["cap"], _G["trace"], _G["seed"] = cap, trace, seed


def _pool_run(policy: KPAPolicy) -> tuple[KPAPolicy, dict]:
    r = simulate(_G["cap"], policy, _G["trace"], _G["seed"])
    return policy, r.summary()


def _run_many(cap: Capacity, trace: Trace, policies: list[KPAPolicy], seed: int, jobs: int):
    if jobs > 1 and len(policies) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(jobs, initializer=_pool_init, initargs=(cap, trace, seed)) as pool:
            return pool.map(_pool_run, policies, chunksize=max(1, len(policies) // (4 * jobs)))
    _pool_init(cap, trace, seed)
    return [_pool_run(p) for p in policies]


def _rank_key(obj: Objective, s: dict) -> tuple:
    p99 = s["ttft_p99"] if obj.metric == "ttft" else s["e2e_p99"]
    p99 = INF if p99 is None or (isinstance(p99, float) and math.isnan(p99)) else p99
    if s["meets_slo"]:
        return (0, s["cost"], p99)
    # infeasible: least violation first (errors weigh like a missed latency objective), then cost
    viol = max(0.0, p99 / obj.p99_slo - 1.0) + max(0.0, s["error_rate"] / max(obj.max_error_rate, 1e-9) - 1.0)
    return (1, viol, s["cost"])


def search(cap: Capacity, trace: Trace, obj: Objective, base: KPAPolicy, grid: Grid, seed: int = 0,
           jobs: int = 1) -> tuple[KPAPolicy, list[dict]]:
    """Simulate every grid point, pick the cheapest meeting the objective, then try the other initial-scale
    values on the winner (initial-scale only matters when the revision is created, i.e. at t=0 of the trace)."""
    runs = _run_many(cap, trace, grid.policies(base), seed, jobs)
    rows = []
    for pol, s in runs:
        r = SimResult(**{k: v for k, v in s.items() if k in SimResult.__dataclass_fields__})
        obj.judge(r)
        s.update(cost=r.cost, meets_slo=r.meets_slo)
        rows.append((pol, s))
    rows.sort(key=lambda ps: _rank_key(obj, ps[1]))
    best_pol, best = rows[0]
    extra = [dataclasses.replace(best_pol, initial_scale=v) for v in grid.initial_scale[1:]
             if v != best_pol.initial_scale and (v > 0 or best_pol.min_scale == 0)]
    best_s = best
    for pol, s in _run_many(cap, trace, extra, seed, 1):
        r = SimResult(**{k: v for k, v in s.items() if k in SimResult.__dataclass_fields__})
        obj.judge(r)
        s.update(cost=r.cost, meets_slo=r.meets_slo)
        rows.append((pol, s))
        # another initial-scale only wins when it is clearly better: feasible and > 0.5 % cheaper (a revision that
        # starts with one pod proves itself on deploy; a few cents do not justify giving that up)
        if _rank_key(obj, s) < _rank_key(obj, best_s) and (
                not best_s["meets_slo"] or s["cost"] < best_s["cost"] * 0.995):
            best_pol, best_s = pol, s
    rows.sort(key=lambda ps: _rank_key(obj, ps[1]))
    best_s["recommended"] = True
    best_pol = dataclasses.replace(best_pol, name="KPA (recommended)")
    table = [{"container_concurrency": p.container_concurrency, "target": p.target, "min_scale": p.min_scale,
              "scale_down_delay": p.scale_down_delay, "initial_scale": p.initial_scale, **s} for p, s in rows]
    return best_pol, table


def annotations(p: KPAPolicy) -> dict[str, str]:
    a = {"autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
         "autoscaling.knative.dev/metric": "concurrency"}
    if p.target is not None:
        a["autoscaling.knative.dev/target"] = _fmt_num(p.target)
    if p.target_utilization != 0.70:
        a["autoscaling.knative.dev/target-utilization-percentage"] = _fmt_num(round(p.target_utilization * 100, 2))
    a["autoscaling.knative.dev/min-scale"] = str(p.min_scale)
    if p.max_scale:
        a["autoscaling.knative.dev/max-scale"] = str(p.max_scale)
    a["autoscaling.knative.dev/initial-scale"] = str(p.initial_scale)
    if p.scale_down_delay:
        a["autoscaling.knative.dev/scale-down-delay"] = _fmt_dur(p.scale_down_delay)
    if p.scale_to_zero_pod_retention_period:
        a["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] = _fmt_dur(
            p.scale_to_zero_pod_retention_period)
    if p.stable_window != 60:
        a["autoscaling.knative.dev/window"] = _fmt_dur(p.stable_window)
    if p.target_burst_capacity != 200:
        a["autoscaling.knative.dev/target-burst-capacity"] = _fmt_num(p.target_burst_capacity)
    return a


def service_snippet(p: KPAPolicy) -> str:
    lines = ["spec:", "  template:", "    metadata:", "      annotations:"]
    lines += [f'        {k}: "{v}"' for k, v in annotations(p).items()]
    lines += ["    spec:", f"      containerConcurrency: {p.container_concurrency}"]
    if p.initial_scale == 0:
        lines.append("# initial-scale 0 needs `allow-zero-initial-scale: \"true\"` in config-autoscaler")
    return "\n".join(lines)


# =================================================================================================================
# Reporting
# =================================================================================================================

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
        out.append(f"| {s['container_concurrency']} | {_fmt_num(s['target'])} | {s['min_scale']} | "
                   f"{_fmt_dur(s['scale_down_delay'])} | {s['initial_scale']} | {_s(s['ttft_p99'])} | "
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


# =================================================================================================================
# CLI
# =================================================================================================================

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


_CANDIDATE_KEYS = {
    "cc": ("container_concurrency", int), "container-concurrency": ("container_concurrency", int),
    "target": ("target", float), "target-utilization-percentage": ("target_utilization", lambda v: float(v) / 100),
    "min-scale": ("min_scale", int), "max-scale": ("max_scale", int), "initial-scale": ("initial_scale", int),
    "activation-scale": ("activation_scale", int), "scale-down-delay": ("scale_down_delay", float),
    "window": ("stable_window", float), "stable-window": ("stable_window", float),
    "panic-window-percentage": ("panic_window_percentage", float),
    "panic-threshold-percentage": ("panic_threshold_percentage", float),
    "target-burst-capacity": ("target_burst_capacity", float), "tbc": ("target_burst_capacity", float),
    "scale-to-zero-pod-retention-period": ("scale_to_zero_pod_retention_period", float),
    "retention": ("scale_to_zero_pod_retention_period", float),
    "scale-to-zero-grace-period": ("scale_to_zero_grace_period", float),
    "max-scale-up-rate": ("max_scale_up_rate", float), "max-scale-down-rate": ("max_scale_down_rate", float),
    "enable-scale-to-zero": ("enable_scale_to_zero", lambda v: v.lower() in ("1", "true", "yes")),
}


def parse_candidate(text: str, base: KPAPolicy, name: str) -> KPAPolicy:
    """"cc=8,target=6,min-scale=1,scale-down-delay=300" -> a KPAPolicy (durations in seconds)."""
    kw: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        k, _, v = item.partition("=")
        k = k.strip().lower().removeprefix("autoscaling.knative.dev/")
        if k not in _CANDIDATE_KEYS:
            raise SystemExit(f"--candidate: unknown key {k!r}; known: {', '.join(sorted(_CANDIDATE_KEYS))}")
        field_name, conv = _CANDIDATE_KEYS[k]
        kw[field_name] = conv(v.strip())
    return dataclasses.replace(base, name=name, **kw)


def parse_duration(v: str | float | int) -> float:
    """Knative/Go duration ("90s", "5m", "1h30m", "1800s") or plain seconds -> seconds."""
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).strip()
    try:
        return float(text)
    except ValueError:
        pass
    import re
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a duration: {v!r}")
    mult = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(a) * mult[b] for a, b in parts)


_ANNOTATION_FIELDS = {
    "target": ("target", float),
    "target-utilization-percentage": ("target_utilization", lambda v: float(v) / 100.0),
    "min-scale": ("min_scale", int), "minscale": ("min_scale", int),
    "max-scale": ("max_scale", int), "maxscale": ("max_scale", int),
    "initial-scale": ("initial_scale", int), "activation-scale": ("activation_scale", int),
    "window": ("stable_window", parse_duration),
    "panic-window-percentage": ("panic_window_percentage", float),
    "panic-threshold-percentage": ("panic_threshold_percentage", float),
    "scale-down-delay": ("scale_down_delay", parse_duration),
    "scale-to-zero-pod-retention-period": ("scale_to_zero_pod_retention_period", parse_duration),
    "target-burst-capacity": ("target_burst_capacity", float),
}


def policy_from_service(path: str) -> tuple[KPAPolicy | None, str]:
    """The KPA settings of the first serving.knative.dev Service in a manifest (revision-template annotations,
    containerConcurrency, timeoutSeconds, progress-deadline) on top of config-autoscaler defaults.
    Returns (policy or None, note)."""
    try:
        import yaml
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    except (OSError, ImportError, Exception) as e:  # noqa: BLE001 - any parse problem: no column
        return None, f"{path}: not read ({e.__class__.__name__})"
    svc = next((d for d in docs if d.get("kind") == "Service" and
                str(d.get("apiVersion", "")).startswith("serving.knative.dev")), None)
    if svc is None:
        return None, f"{path}: no Knative Service"
    tmpl = (svc.get("spec") or {}).get("template") or {}
    ann = ((tmpl.get("metadata") or {}).get("annotations")) or {}
    spec = tmpl.get("spec") or {}
    cls = ann.get("autoscaling.knative.dev/class", "kpa.autoscaling.knative.dev")
    if "kpa" not in cls:
        return None, f"{path}: autoscaling class {cls} is not the KPA"
    metric = ann.get("autoscaling.knative.dev/metric", "concurrency")
    if metric != "concurrency":
        return None, f"{path}: metric {metric} is not modelled (concurrency only)"
    kw: dict[str, Any] = {"container_concurrency": int(spec.get("containerConcurrency") or 0)}
    if spec.get("timeoutSeconds"):
        kw["request_timeout"] = float(spec["timeoutSeconds"])
    if ann.get("serving.knative.dev/progress-deadline"):
        kw["progress_deadline"] = parse_duration(ann["serving.knative.dev/progress-deadline"])
    for key, value in ann.items():
        if not key.startswith("autoscaling.knative.dev/"):
            continue
        short = key.split("/", 1)[1].lower()
        if short in _ANNOTATION_FIELDS:
            name, conv = _ANNOTATION_FIELDS[short]
            kw[name] = conv(value)
    name = (svc.get("metadata") or {}).get("name", "service")
    return KPAPolicy(name=f"KPA ({os.path.basename(path)})", **kw), f"{path}: Service {name}"


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


def trace_start(text: str | None, sched: Schedule, start_hour: float):
    """The aware datetime of the trace's t=0."""
    import datetime as dt
    from zoneinfo import ZoneInfo
    if text:
        t = dt.datetime.fromisoformat(text)
        return t if t.tzinfo else t.replace(tzinfo=ZoneInfo(sched.tz))
    return dt.datetime(2026, 1, 5, tzinfo=ZoneInfo(sched.tz)) + dt.timedelta(hours=start_hour)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    cap = Capacity.load(args.capacity)
    hours = 3.0 if args.quick and args.hours == 24.0 else args.hours
    start_hour = 7.0 if args.quick else 0.0
    if args.trace:
        trace = load_trace(args.trace, cap, seed=args.seed)
        start_hour = 0.0
    else:
        trace = generate_diurnal(cap, hours=hours, peak_rps=args.peak_rps, seed=args.seed,
                                 bursts_per_day=args.bursts_per_day, night_trickle_per_hour=args.night_trickle,
                                 start_hour=start_hour)
    if args.save_trace:
        trace.save_csv(args.save_trace)
    obj = Objective(args.p99_slo, args.slo_metric, args.max_error_rate, args.gpu_hour_price)

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
    scenarios: list[KPAPolicy | HPAPolicy] = [hpa, kpa_default]
    if svc_pol is not None:
        if args.request_timeout:
            svc_pol.request_timeout = args.request_timeout
        scenarios.append(svc_pol)
    for k, text in enumerate(args.candidate, 1):
        scenarios.append(parse_candidate(text, kpa_default, f"KPA (candidate {k})"))
    grid_rows: list[dict] = []
    rec: KPAPolicy | None = None
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
        rec, grid_rows = search(cap, trace, obj, base, grid, seed=args.seed, jobs=args.jobs)
        scenarios.append(rec)

    switches: dict[int, list[tuple[float, int]]] = {}      # scenario index -> its min-scale switches
    sched_note = ""
    if args.schedule:
        sched = Schedule.load(args.schedule)
        t0 = trace_start(args.trace_start, sched, start_hour)
        initial, sw = sched.switches(t0, trace.horizon)
        for k, pol in enumerate(list(scenarios)):
            if isinstance(pol, KPAPolicy) and (pol is svc_pol or pol is rec or (svc_pol is None and pol is kpa_default)):
                twin = dataclasses.replace(pol, name=f"{pol.name.removesuffix(')')} + schedule)",
                                           min_scale=pol.min_scale if initial is None else initial)
                switches[len(scenarios)] = sw
                scenarios.append(twin)
        sched_note = (f"Schedule: `{args.schedule}`: {sched.describe()}; trace starts {t0:%a %Y-%m-%d %H:%M %Z}, "
                      f"{len(sw)} switches in it, min-scale {initial if initial is not None else 'unchanged'} at "
                      "the start")

    results = [obj.judge(simulate(cap, pol, trace, args.seed, record=bool(args.plot), switches=switches.get(k, ())))
               for k, pol in enumerate(scenarios)]

    lines = []
    if cap.placeholder:
        lines.append("> **PLACEHOLDER capacity numbers** - " + cap.source)
        lines.append("")
    lines.append(f"Capacity: `{args.capacity}`" + ("" if cap.placeholder else f" ({cap.source})") + "  ")
    if args.service:
        lines.append(f"Service manifest: {svc_note}  ")
    lines.append(f"Trace: {trace.description}  ")
    lines.append(f"Objective: {obj.describe()}; GPU price ${obj.gpu_hour_price:g}/h; max-scale {args.max_scale}"
                 + ("  " if sched_note else ""))
    if sched_note:
        lines.append(sched_note)
    lines.append("")
    lines.append(markdown_table(results, obj, revisions=bool(switches)))
    if rec is not None:
        lines.append("")
        feasible = sum(1 for s in grid_rows if s["meets_slo"])
        lines.append(f"Searched {len(grid_rows)} KPA settings, {feasible} meet the objective. "
                     + ("Recommended (cheapest that meets it):" if results[-1].meets_slo else
                        "**None meets the objective**; closest:"))
        lines.append("")
        lines.append("```yaml")
        lines.append(service_snippet(rec))
        lines.append("```")
        lines.append("")
        lines.append("Best grid points:")
        lines.append("")
        lines.append(grid_table(grid_rows, obj))
    lines.append("")
    lines.append("The HPA column models CPU utilisation from the capacity file's cpu_util-vs-concurrency: on a GPU "
                 "server the CPU mostly waits for the GPU, so CPU is a poor proxy for load.")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_table(text, markdown_table(results, obj, revisions=bool(switches))))
    if args.plot:
        plot(results, trace, obj, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json_out:
        doc = {
            "capacity": {"path": args.capacity, "source": cap.source, "placeholder": cap.placeholder},
            "trace": {"description": trace.description, "requests": int(len(trace.arrivals)),
                      "horizon_s": trace.horizon},
            "objective": dataclasses.asdict(obj),
            "schedule": ({"path": args.schedule, "note": sched_note} if args.schedule else None),
            "scenarios": [{"policy": dataclasses.asdict(pol), **r.summary(),
                           **({"switches": switches[k]} if k in switches else {})}
                          for k, (pol, r) in enumerate(zip(scenarios, results))],
            "recommendation": ({"policy": dataclasses.asdict(rec), "annotations": annotations(rec),
                                "container_concurrency": rec.container_concurrency} if rec else None),
            "grid": grid_rows,
            "elapsed_s": time.perf_counter() - t_start,
        }
        with open(args.json_out, "w") as f:
            json.dump(_nan_to_none(doc), f, indent=2, default=str)
    print(f"\n({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
