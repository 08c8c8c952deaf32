"""The autoscaling policies and their controllers: Knative's KPA (settings, the decider of
pkg/autoscaler/scaling/autoscaler.go and the PodAutoscaler scaler of pkg/reconciler/autoscaling/kpa/scaler.go) and,
as a baseline, the Kubernetes HPA v2 on CPU utilisation."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from .units import fmt_dur, fmt_num


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
                 f"target={fmt_num(self.target) if self.target is not None else 'default'}"
                 f" (eff. {tgt:g})",
                 f"min={self.min_scale}", f"max={self.max_scale or 'inf'}", f"initial={self.initial_scale}",
                 f"scale-down-delay={fmt_dur(self.scale_down_delay)}"]
        if self.scale_to_zero_pod_retention_period:
            parts.append(f"retention={fmt_dur(self.scale_to_zero_pod_retention_period)}")
        if self.target_burst_capacity != 200:
            parts.append(f"tbc={fmt_num(self.target_burst_capacity)}")
        if self.stable_window != 60:
            parts.append(f"window={fmt_dur(self.stable_window)}")
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
                f"down-stabilization {fmt_dur(self.scale_down_stabilization)}")


# The KPA decider (pkg/autoscaler/scaling/autoscaler.go) and PA scaler (pkg/reconciler/autoscaling/kpa/scaler.go)


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
