"""The discrete-event simulation of one Knative Service under one autoscaling policy: the metric pipeline, the
activator, queue-proxy and the pods, driven by a trace; the KPA or HPA models of policies.py decide the pod count.
What is modelled and where in Knative it comes from: the package docstring (autoscaling/__init__.py)."""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .capacity import Capacity
from .policies import HPAController, HPAPolicy, KPADecider, KPAPolicy, KPAScaler
from .trace import Trace

INF = float("inf")

POD_STARTING, POD_READY, POD_TERMINATING, POD_GONE = 0, 1, 2, 3


class Pod:
    __slots__ = ("id", "created", "ready_at", "state", "active", "queue", "qlive", "area", "last_t", "gone_at")

    def __init__(self, pid: int, created: float, ready_at: float):
        self.id, self.created, self.ready_at = pid, created, ready_at
        self.state = POD_STARTING
        self.active = 0           # requests being generated
        self.queue: deque = deque()
        self.qlive = 0            # live requests in `queue`
        self.area = 0.0           # integral of `active` (for the CPU model)
        self.last_t = created
        self.gone_at = INF

    def integrate(self, t: float) -> None:
        """Add `active` up to t to `area`."""
        self.area += self.active * (t - self.last_t)
        self.last_t = t

    def go(self, t: float) -> None:
        """The pod is gone at t (its GPU is released)."""
        self.state = POD_GONE
        self.gone_at = t

    def retire(self, t: float) -> None:
        """Taken out of service: it goes now when idle, else once it has drained its requests."""
        if self.active == 0 and self.qlive == 0:
            self.go(t)
        else:
            self.state = POD_TERMINATING

    def drained(self, t: float) -> None:
        """A request left the pod: a terminating pod with nothing left goes."""
        if self.state == POD_TERMINATING and self.active == 0 and self.qlive == 0:
            self.go(t)


class ConcurrencyMetric:
    """The autoscaler's metric (pkg/autoscaler/metrics, aggregation/bucketing.go): requests in the system, averaged
    per 1-second bucket; `window_avg` averages the buckets of a window as TimedFloat64Buckets does (only the buckets
    written since the last gap of a whole window; none written in the window: no data). A bucket is written when it
    saw requests or a ready pod. `cum` holds the prefix sums of the buckets (bucket s = cum[s + 1] - cum[s])."""

    def __init__(self, windows: Sequence[int]):
        self.cum = [0.0]
        self.sec = 0                  # the open bucket
        self.area = 0.0               # integral of the concurrency over the open bucket so far
        self.last_t = 0.0
        self.pods_seen = False        # a pod was ready during the open bucket
        self.last_write: int | None = None
        self.first_w: dict[int, int | None] = {w: None for w in windows}   # first bucket of each window's data

    def advance(self, t: float, n_sys: int, has_pods: bool) -> None:
        """Integrate `n_sys` requests in the system up to t, closing the buckets passed. `n_sys` and `has_pods`
        (a pod is ready) have held since the last call."""
        while t >= self.sec + 1:
            if n_sys == 0 and not has_pods and not self.pods_seen and self.area == 0.0:
                # idle at zero: jump to the second holding t (no writes, zero buckets)
                s_to = int(t)
                if s_to > self.sec:
                    base = self.cum[-1]
                    self.cum.extend([base] * (s_to - self.sec))
                    self.sec = s_to
                    self.last_t = float(s_to)
                break
            self.area += n_sys * (self.sec + 1 - self.last_t)
            self._close_bucket(has_pods)
        self.area += n_sys * (t - self.last_t)
        self.last_t = t

    def _close_bucket(self, has_pods: bool) -> None:
        s = self.sec
        self.cum.append(self.cum[-1] + self.area)
        if self.area > 0.0 or self.pods_seen:
            last_write, first_w = self.last_write, self.first_w
            for w in first_w:
                if first_w[w] is None or last_write is None or s - last_write >= w:
                    first_w[w] = s
            self.last_write = s
        self.sec = s + 1
        self.last_t = float(self.sec)
        self.area = 0.0
        self.pods_seen = has_pods

    def window_avg(self, w: int, now_s: int) -> float | None:
        """Average over the w buckets ending at now_s, None without data."""
        last_write = self.last_write
        if last_write is None:
            return None
        d = now_s - last_write
        if d > w:
            return None
        if d == w:
            return 0.0
        lo = max(0, now_s - w + 1)
        total = self.cum[now_s + 1] - self.cum[lo]
        nb = last_write - self.first_w[w] + 1
        nb = min(nb, w if d <= 0 else w - d)
        return round(total / nb, 9) if nb > 0 else 0.0

    def with_stat(self, w: int, stat: float) -> float:
        """Average over the w buckets ending at the open one, that bucket holding `stat` (the activator's
        concurrency when it pokes the autoscaler)."""
        s = self.sec
        fresh = self.last_write is None or s - self.last_write >= w
        first = s if fresh else self.first_w[w]
        total = self.cum[s] - self.cum[max(0, s - w + 1)] + stat
        return round(total / min(s - first + 1, w), 9)


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


    # ---- a run ---------------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        self._begin()
        arr, n_req, horizon, heap = self.arr, len(self.arr), self.horizon, self.heap
        heappop = heapq.heappop
        on_event = (self._on_done, self._on_ready, self._on_timeout)      # indexed by EV_*
        i = 0
        next_tick = 0.0
        while True:
            t_arr = arr[i] if i < n_req else INF
            t_ev = heap[0][0] if heap else INF
            if next_tick <= t_arr and next_tick <= t_ev:
                if i >= n_req and self.n_sys == 0 and next_tick > horizon:
                    break
                self._on_tick(next_tick)
                next_tick = next_tick + self.interval
            elif t_ev <= t_arr:
                t, _, kind, r, pod = heappop(heap)
                self._advance(t)
                on_event[kind](t, r, pod)
            else:
                self._advance(t_arr)
                self._on_arrival(i, t_arr)
                i += 1
        return self._result()

    def _begin(self) -> None:
        """The state of a run: requests, pods, activator, metric, controllers; the initial pods are created."""
        p = self.p
        self.arr = self.trace.arrivals.tolist()
        self.tok = self.trace.output_tokens.tolist()
        n = len(self.arr)
        self.horizon = float(self.trace.horizon)
        self.timeout = p.request_timeout
        self.aq_depth = p.activator_queue_depth
        # requests
        self.status = [ST_WAIT] * n
        self.ttft_l = [math.nan] * n
        self.e2e_l = [math.nan] * n
        self.cold = [False] * n
        self.at_zero = 0
        self.failures: dict[str, int] = {}
        self.n_sys = 0                 # requests in the system (activator, queue-proxy, engine)
        # events: (time, seq, EV_*, request, pod)
        self.heap: list = []
        self.seq = 0
        # pods
        self.pods: list[Pod] = []
        self.ready: list[Pod] = []     # ready, not terminating
        self.starting: list[Pod] = []
        self.legacy: list[Pod] = []    # the previous revision's ready pods, serving until the new revision is ready
        self.handover_n = 0            # ready pods the new revision needs before the old one's go
        self.revisions = 1
        self.pod_starts = 0
        self.max_pods = 0
        # activator
        self.act_q: deque = deque()
        self.act_live = 0              # live requests in act_q
        # metric
        if self.kpa:
            self.sw = int(round(p.stable_window))
            self.pw = max(1, int(math.ceil(p.stable_window * p.panic_window_percentage / 100.0)))
        else:
            self.sw, self.pw = 60, 6
        self.metric = ConcurrencyMetric((self.sw, self.pw))
        # series
        self.ticks: dict[str, list] = dict(tick_t=[], tick_ready=[], tick_repl=[], tick_desired=[], tick_panic=[])
        self.panic_ticks = 0
        # controllers
        self.desired = -1
        tbc = self.tbc = p.target_burst_capacity
        if not self.kpa or tbc in (-1, 0):
            self.ebc = int(tbc) if self.kpa else -1
        else:  # multiscaler.createScaler: initial EBC assumes one pod
            self.ebc = int(1 * p.resolve_target()[1] - tbc)
        self.rev_policy = p
        self.sw_i = 0                  # next scheduled switch
        self.decider: KPADecider | None = None
        self.scaler: KPAScaler | None = None
        self.hpa: HPAController | None = None
        if self.kpa:
            self.decider = KPADecider(p)
            self.scaler = KPAScaler(p)
            self.interval = p.tick
            for _ in range(self.scaler.replicas):
                self._new_pod(0.0)
            self.proxy = self.scaler.activator_in_path     # the activator is in the request path
        else:
            self.hpa = HPAController(p)
            self.interval = p.sync_period
            for _ in range(self.hpa.replicas):
                self._new_pod(0.0)
            self.proxy = True
            self.last_sync = 0.0
        self.max_pods = len(self.starting)

    def _advance(self, t: float) -> None:
        self.metric.advance(t, self.n_sys, bool(self.ready or self.legacy))

    def _push(self, t: float, kind: int, r: int, pod: Pod | None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, r, pod))

    # ---- events --------------------------------------------------------------------------------------------------
    def _on_tick(self, t: float) -> None:
        """The autoscaler's tick: scheduled min-scale switches due, then the KPA or HPA decision."""
        self._advance(t)
        switches = self.switches
        while self.sw_i < len(switches) and switches[self.sw_i][0] <= t:
            self._switch_revision(t, switches[self.sw_i][1])
            self.sw_i += 1
        if self.kpa:
            self._kpa_tick(t)
        else:
            self._hpa_tick(t)
        if self.record:
            ticks = self.ticks
            ticks["tick_t"].append(t)
            ticks["tick_ready"].append(len(self.ready))
            ticks["tick_repl"].append(len(self.ready) + len(self.starting))
            ticks["tick_desired"].append(self.desired if self.kpa else self.hpa.replicas)
            ticks["tick_panic"].append(self.decider.in_panic if self.kpa else False)

    def _on_arrival(self, r: int, t: float) -> None:
        """A request arrives: straight to a pod, or through the activator (buffered while no pod has room)."""
        self.n_sys += 1
        serving = self.ready + self.legacy if self.legacy else self.ready
        if not serving:
            self.at_zero += 1
        if self.proxy or not serving:
            if self.act_live == 0:
                pod = self._free_pod()
                if pod is not None:
                    self._to_pod(r, pod, t)
                    return
            if self.act_live >= self.aq_depth:
                self._fail(r, 503, t)
                return
            self.act_q.append(r)
            self.act_live += 1
            self._push(self.arr[r] + self.timeout, EV_TIMEOUT, r, None)
            if self.kpa and self.desired == 0 and not serving and not self.starting:
                self._kpa_poke(t)
        else:
            self._to_pod(r, serving[int(self.route_rng[r] * len(serving))], t)

    def _on_done(self, t: float, r: int, pod: Pod) -> None:
        """A request finished: the pod starts what queue-proxy holds, or takes from the activator."""
        status = self.status
        status[r] = 200
        self.n_sys -= 1
        pod.integrate(t)
        pod.active -= 1
        while pod.queue and pod.active < self.slots:
            r2 = pod.queue.popleft()
            if status[r2] == ST_WAIT:
                pod.qlive -= 1
                self._start(r2, pod, t)
        if pod.state == POD_READY:
            if self.act_live:
                self._drain_activator(t)
        else:
            pod.drained(t)

    def _on_ready(self, t: float, _r: int, pod: Pod) -> None:
        """A pod's cold start is over (unless it was dropped while starting)."""
        if pod.state != POD_STARTING:
            return
        pod.state = POD_READY
        pod.last_t = t
        self.starting.remove(pod)
        self.ready.append(pod)
        self.metric.pods_seen = True
        if self.legacy and len(self.ready) >= self.handover_n:
            self._hand_over(t)
        if self.act_live:
            self._drain_activator(t)

    def _on_timeout(self, t: float, r: int, pod: Pod | None) -> None:
        """The revision timeout of a request still waiting: 503 from the activator, 504 from queue-proxy."""
        if self.status[r] != ST_WAIT:
            return
        if pod is None:
            self.act_live -= 1
            self._fail(r, 503, t)
        else:
            pod.qlive -= 1
            self._fail(r, 504, t)
            pod.drained(t)

    # ---- requests ------------------------------------------------------------------------------------------------
    def _fail(self, r: int, code: int, t: float) -> None:
        self.status[r] = code
        self.e2e_l[r] = t - self.arr[r]
        key = str(code)
        self.failures[key] = self.failures.get(key, 0) + 1
        self.n_sys -= 1

    def _start(self, r: int, pod: Pod, t: float) -> None:
        """The engine starts request r: TTFT and TPOT drawn at the pod's new concurrency."""
        pod.integrate(t)
        pod.active += 1
        n = pod.active
        lat = self.lat
        m1, s1, m2, s2 = lat[n] if n < len(lat) else lat[-1]
        ttft = math.exp(m1 + s1 * self.z1[r])
        done = t + ttft + (self.tok[r] - 1) * math.exp(m2 + s2 * self.z2[r])
        a = self.arr[r]
        self.ttft_l[r] = t - a + ttft
        self.e2e_l[r] = done - a
        if pod.ready_at > a:
            self.cold[r] = True
        self.status[r] = ST_RUN
        self._push(done, EV_DONE, r, pod)

    def _to_pod(self, r: int, pod: Pod, t: float) -> None:
        """Request r reaches the pod: it runs, waits in queue-proxy (until the timeout), or overflows."""
        if pod.active < self.slots:
            self._start(r, pod, t)
        elif pod.qlive < self.qcap:
            pod.queue.append(r)
            pod.qlive += 1
            self._push(self.arr[r] + self.timeout, EV_TIMEOUT, r, pod)
        else:
            self._fail(r, self.overflow_code, t)

    def _free_pod(self) -> Pod | None:
        """The least loaded serving pod with a free containerConcurrency slot."""
        best = None
        cc = self.cc
        for pd in (self.ready + self.legacy if self.legacy else self.ready):
            load = pd.active + pd.qlive
            if cc > 0 and load >= cc:
                continue
            if best is None or load < best.active + best.qlive:
                best = pd
        return best

    def _drain_activator(self, t: float) -> None:
        """Send the activator's buffered requests, oldest first, while a pod has room."""
        act_q, status = self.act_q, self.status
        while self.act_live > 0:
            pod = self._free_pod()
            if pod is None:
                return
            while act_q:
                r = act_q.popleft()
                if status[r] == ST_WAIT:
                    break
            else:
                return
            self.act_live -= 1
            self._to_pod(r, pod, t)

    # ---- pods ----------------------------------------------------------------------------------------------------
    def _new_pod(self, t: float) -> None:
        cs = self.next_cold_start()
        pod = Pod(len(self.pods), t, t + cs)
        self.pods.append(pod)
        self.starting.append(pod)
        self.pod_starts += 1
        self._push(t + cs, EV_READY, 0, pod)

    def _scale_to(self, t: float, n: int) -> None:
        """n pods for the current revision: unready pods go first (newest first), then the most recently ready."""
        ready, starting = self.ready, self.starting
        cur = len(ready) + len(starting)
        while cur < n:
            self._new_pod(t)
            cur += 1
        while cur > n:
            if starting:
                starting.pop().go(t)
            else:
                pod = max(ready, key=lambda x: (x.ready_at, x.id))
                ready.remove(pod)
                pod.retire(t)
            cur -= 1
        if n + len(self.legacy) > self.max_pods:
            self.max_pods = n + len(self.legacy)

    def _hand_over(self, t: float) -> None:
        """The new revision is ready: the old one's pods drain and go."""
        for pd in self.legacy:
            pd.retire(t)
        self.legacy.clear()
        self.handover_n = 0

    def _switch_revision(self, t: float, min_scale: int) -> None:
        """A patched min-scale: a new revision with its own autoscaler; the old one's pods serve until it is ready."""
        if min_scale == self.rev_policy.min_scale:
            return                        # the same template: Knative creates no revision
        self.revisions += 1
        self.rev_policy = dataclasses.replace(self.rev_policy, min_scale=min_scale)
        for pd in self.starting:
            pd.go(t)
        self.starting.clear()
        self.legacy.extend(self.ready)
        self.ready.clear()
        self.decider = KPADecider(self.rev_policy, now=t)
        self.scaler = KPAScaler(self.rev_policy, now=t)
        self.handover_n = self.scaler.replicas
        self._scale_to(t, self.scaler.replicas)
        self.proxy = self.scaler.activator_in_path
        if self.handover_n == 0:
            self._hand_over(t)

    # ---- controllers ---------------------------------------------------------------------------------------------
    def _kpa_tick(self, t: float) -> None:
        now_s = self.metric.sec - 1
        st = self.metric.window_avg(self.sw, now_s)
        if st is not None:
            pn = self.metric.window_avg(self.pw, now_s) or 0.0
            self.desired, self.ebc = self.decider.scale(t, st, pn, len(self.ready))
        self._kpa_reconcile(t)
        if self.decider.in_panic:
            self.panic_ticks += 1

    def _kpa_poke(self, t: float) -> None:
        """A request reached the activator while the revision is at zero: the activator's stat (its
        concurrency, recorded in the current second) makes the multiscaler tick immediately."""
        stable = self.metric.with_stat(self.sw, self.n_sys)
        panic = self.metric.with_stat(self.pw, self.n_sys)
        self.desired, self.ebc = self.decider.scale(t, stable, panic, len(self.ready))
        self._kpa_reconcile(t)

    def _kpa_reconcile(self, t: float) -> None:
        n = self.scaler.reconcile(t, self.desired, self.ebc, len(self.ready))
        if n is not None:
            self._scale_to(t, n)
        self.proxy = self.scaler.activator_in_path

    def _hpa_tick(self, t: float) -> None:
        cap = self.cap
        utils = []
        for pd in self.ready:
            pd.integrate(t)
            since = max(self.last_sync, pd.ready_at)
            utils.append(cap.cpu_at(pd.area / (t - since)) if t > since else cap.cpu_at(pd.active))
            pd.area = 0.0
        self.last_sync = t
        n = self.hpa.step(t, utils, len(self.starting))
        if n != len(self.ready) + len(self.starting):
            self._scale_to(t, n)
        # the activator is in the path as for KPA: at zero ready pods, or while burst capacity is short
        cap_total = len(self.ready) * (self.cc or 100)
        tbc = self.tbc
        self.proxy = (not self.ready) or tbc == -1 or (tbc > 0 and cap_total - tbc - self.n_sys < 0)

    # ---- the result ----------------------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        H = self.horizon
        st = np.asarray(self.status)
        okm = st == 200
        ttft = np.asarray(self.ttft_l)[okm]
        e2e = np.asarray(self.e2e_l)[okm]
        gpu_s = sum(max(0.0, min(pd.gone_at, H) - pd.created) for pd in self.pods if pd.created < H)

        def pct(a, q):
            return float(np.percentile(a, q)) if len(a) else math.nan

        mean_pods = gpu_s / H if H > 0 else 0.0
        res = SimResult(name=self.p.name, label=self.p.label(), requests=len(st), ok=int(okm.sum()),
                        failures=dict(sorted(self.failures.items())), cold_start_hits=int(np.asarray(self.cold).sum()),
                        arrived_at_zero=self.at_zero, ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99),
                        e2e_p50=pct(e2e, 50), e2e_p99=pct(e2e, 99), gpu_hours=gpu_s / 3600.0,
                        pod_starts=self.pod_starts, mean_pods=mean_pods, max_pods=self.max_pods,
                        panic_ticks=self.panic_ticks, horizon_h=H / 3600.0, revisions=self.revisions)
        if self.record:
            res.series = dict(self.ticks, cum=self.metric.cum, arrival=self.trace.arrivals, status=st,
                              ttft=np.asarray(self.ttft_l), e2e=np.asarray(self.e2e_l), cold=np.asarray(self.cold))
        return res


def simulate(cap: Capacity, policy: KPAPolicy | HPAPolicy, trace: Trace, seed: int = 0,
             record: bool = False, switches: Sequence[tuple[float, int]] = ()) -> SimResult:
    return Simulator(cap, policy, trace, seed=seed, record=record, switches=switches).run()
