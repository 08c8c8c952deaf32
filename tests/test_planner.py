"""scripts/plan_autoscaling.py against hand-computed cases of Knative's KPA (pkg/autoscaler/scaling/autoscaler.go,
pkg/reconciler/autoscaling/kpa/scaler.go) and the Kubernetes HPA formula. Expected numbers are worked out in the
comments from the formulas, not taken from the simulator's own output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import plan_autoscaling as pa  # noqa: E402


def det_capacity(ttft: float = 5.0, cold: float = 10.0, cpu: float = 0.5) -> pa.Capacity:
    """Deterministic pod: every request takes exactly `ttft` seconds (one output token), any concurrency;
    every cold start takes exactly `cold` seconds."""
    return pa.Capacity.from_dict({
        "source": "test",
        "engine": {"max_num_seqs": 256, "max_queue_size": 1024},
        "workload": {"output_tokens": {"p50": 1, "p99": 1}, "max_tokens": 1},
        "cold_start_s": {"samples": [cold]},
        "levels": [{"concurrency": 1, "ttft_s": {"p50": ttft, "p99": ttft}, "tpot_s": {"p50": 0.01, "p99": 0.01},
                    "cpu_util": cpu}],
    })


def trace(arrivals, horizon: float) -> pa.Trace:
    a = np.asarray(arrivals, dtype=float)
    return pa.Trace(a, np.ones(len(a), dtype=np.int64), float(horizon), "test")


def run(policy, tr, cap=None, **kw) -> pa.SimResult:
    return pa.Simulator(cap or det_capacity(**kw), policy, tr, record=True).run()


def replicas_at(res: pa.SimResult, t: float) -> int:
    ts = res.series["tick_t"]
    return res.series["tick_repl"][ts.index(float(t))]


def first_tick_with_replicas(res: pa.SimResult, n: int) -> float:
    for t, r in zip(res.series["tick_t"], res.series["tick_repl"]):
        if r == n:
            return t
    raise AssertionError(f"never at {n} replicas")


# ----------------------------------------------------------------------------------------------------------------
# Target resolution (ResolveMetricTarget)
# ----------------------------------------------------------------------------------------------------------------

def test_target_resolution():
    # containerConcurrency 0 -> container-concurrency-target-default 100 x 70 % = 70
    assert pa.KPAPolicy().resolve_target() == pytest.approx((70.0, 100.0))
    # containerConcurrency 8 -> 8 x 0.7 = 5.6
    assert pa.KPAPolicy(container_concurrency=8).resolve_target() == pytest.approx((5.6, 8.0))
    # target annotation 4 with cc 8 -> total min(4, 8) = 4, target 4 x 0.7 = 2.8
    assert pa.KPAPolicy(container_concurrency=8, target=4).resolve_target() == pytest.approx((2.8, 4.0))
    # annotation above cc is capped by cc: min(20, 8) x 1.0 = 8
    assert pa.KPAPolicy(container_concurrency=8, target=20, target_utilization=1.0).resolve_target() == \
        pytest.approx((8.0, 8.0))


# ----------------------------------------------------------------------------------------------------------------
# The decider's formulas
# ----------------------------------------------------------------------------------------------------------------

def test_stable_mode_desired_pods():
    # target 10 x 0.7 = 7; stable = panic = 30 with 3 ready pods: ceil(30/7) = 5 pods;
    # panic check: 5 / 3 = 1.67 < 2 -> stable mode; clamps [floor(3/2)=1, ceil(1000*3)=3000] do not bind.
    d = pa.KPADecider(pa.KPAPolicy(target=10))
    desired, _ = d.scale(0.0, 30.0, 30.0, 3)
    assert desired == 5
    assert not d.in_panic


def test_panic_entered_at_twice_capacity_and_no_scale_down_in_panic():
    p = pa.KPAPolicy(target=10, target_utilization=1.0)              # target 10
    d = pa.KPADecider(p)
    # 2 ready pods, panic-window concurrency 39: ceil(39/10) = 4, 4/2 = 2.0 >= 2.0 -> panic
    desired, _ = d.scale(10.0, 10.0, 39.0, 2)
    assert d.in_panic
    assert desired == 4                                               # max(ceil(10/10)=1, 4)
    # 38 would be ceil(3.8) = 4 too; 30 -> 3 pods, 3/2 = 1.5 < 2: not over the threshold
    d2 = pa.KPADecider(p)
    d2.scale(10.0, 10.0, 30.0, 2)
    assert not d2.in_panic
    # load drops: stable 10 -> 1 pod, panic 5 -> 1 pod; still in panic (last panic tick 10 s ago): stays at 4
    for t in (12.0, 20.0, 40.0, 70.0):
        desired, _ = d.scale(t, 10.0, 5.0, 4)
        assert desired == 4, t
        assert d.in_panic


def test_panic_ends_one_stable_window_after_the_last_panic_tick():
    p = pa.KPAPolicy(target=10, target_utilization=1.0)
    d = pa.KPADecider(p)
    d.scale(10.0, 10.0, 40.0, 2)          # panic tick at t=10
    d.scale(12.0, 10.0, 40.0, 2)          # ... extended at t=12 (last panic tick)
    # un-panic needs panicTime + 60 s strictly before now: t > 72
    for t in np.arange(14.0, 72.1, 2.0):
        desired, _ = d.scale(float(t), 10.0, 5.0, 4)
        assert d.in_panic, t
        assert desired == 4
    desired, _ = d.scale(74.0, 10.0, 5.0, 4)
    assert not d.in_panic
    # back to stable: ceil(10/10) = 1, but scale-down is clamped to floor(4/2) = 2
    assert desired == 2


def test_scale_up_rate_clamp():
    # max-scale-up-rate 2 with 3 ready pods: at most ceil(2*3) = 6, although ceil(100/10) = 10 wanted
    p = pa.KPAPolicy(target=10, target_utilization=1.0, max_scale_up_rate=2.0)
    desired, _ = pa.KPADecider(p).scale(0.0, 100.0, 100.0, 3)
    assert desired == 6
    # with 0 ready pods the autoscaler uses readyPods = max(1, 0) = 1: at most ceil(2*1) = 2
    desired, _ = pa.KPADecider(p).scale(0.0, 100.0, 100.0, 0)
    assert desired == 2


def test_scale_down_rate_clamp():
    # 8 ready, stable 5 -> ceil(5/10) = 1 wanted, but at least floor(8/2) = 4
    p = pa.KPAPolicy(target=10, target_utilization=1.0)
    desired, _ = pa.KPADecider(p).scale(0.0, 5.0, 5.0, 8)
    assert desired == 4
    # from 1 ready pod: floor(1/2) = 0, so zero is allowed
    desired, _ = pa.KPADecider(p).scale(0.0, 0.0, 0.0, 1)
    assert desired == 0


def test_scale_down_delay_keeps_the_max_of_the_window():
    # delay 10 s = ceil(10/2) = 5 ticks; desired 6 at t=0, then 1: stays 6 through t=8, drops at t=10
    p = pa.KPAPolicy(target=10, target_utilization=1.0, scale_down_delay=10.0, max_scale_down_rate=1000)
    d = pa.KPADecider(p)
    assert d.scale(0.0, 60.0, 60.0, 6)[0] == 6
    for t in (2.0, 4.0, 6.0, 8.0):
        assert d.scale(t, 10.0, 10.0, 6)[0] == 6, t
    assert d.scale(10.0, 10.0, 10.0, 6)[0] == 1


def test_excess_burst_capacity():
    # EBC = floor(ready * total - TBC - panic) = floor(3*8 - 10 - 5.5) = 8
    p = pa.KPAPolicy(container_concurrency=8, target_burst_capacity=10)
    assert pa.KPADecider(p).scale(0.0, 5.5, 5.5, 3)[1] == 8
    assert pa.KPADecider(pa.KPAPolicy(container_concurrency=8, target_burst_capacity=0)).scale(0, 1, 1, 1)[1] == 0
    assert pa.KPADecider(pa.KPAPolicy(target_burst_capacity=-1)).scale(0, 1, 1, 1)[1] == -1


# ----------------------------------------------------------------------------------------------------------------
# Whole simulation: metric windows, scaler, activator, pods
# ----------------------------------------------------------------------------------------------------------------

def test_constant_load_settles_at_ceil_concurrency_over_target():
    # one request per second, each takes exactly 10 s, cc 0 (no per-pod limit): 10 requests in the system in
    # steady state. target annotation 2 x 0.7 = 1.4 -> ceil(10 / 1.4) = ceil(7.14) = 8 pods, in stable mode.
    p = pa.KPAPolicy(target=2)
    res = run(p, trace(np.arange(0, 600, 1.0), 600), ttft=10.0, cold=1.0)
    s = res.series
    end = s["tick_t"].index(590.0)
    assert s["tick_desired"][end] == 8
    assert s["tick_ready"][end] == 8
    assert not s["tick_panic"][end]
    assert res.failed == 0


def test_min_and_max_scale_respected():
    # the constant load above wants 8 pods; max-scale 3 caps the deployment at 3
    res = run(pa.KPAPolicy(target=2, max_scale=3), trace(np.arange(0, 300, 1.0), 300), ttft=10.0, cold=1.0)
    assert max(res.series["tick_repl"]) == 3
    assert max(res.series["tick_desired"]) >= 8
    # min-scale 2 and no traffic at all: 2 pods for the whole hour, never 0
    res = run(pa.KPAPolicy(min_scale=2), trace([], 3600), cold=1.0)
    assert min(res.series["tick_repl"][1:]) == 2
    assert res.gpu_hours == pytest.approx(2.0)


def test_scale_down_never_faster_than_half_the_ready_pods():
    # 8 pods serving the constant load, then traffic stops at t=300: each tick may go at most to floor(ready/2)
    p = pa.KPAPolicy(target=2, scale_down_delay=0)
    res = run(p, trace(np.arange(0, 300, 1.0), 900), ttft=10.0, cold=1.0)
    s = res.series
    seen_drop = False
    for k in range(1, len(s["tick_t"])):
        assert s["tick_repl"][k] >= s["tick_ready"][k - 1] // 2
        seen_drop |= s["tick_repl"][k] < s["tick_repl"][k - 1]
    assert seen_drop
    assert s["tick_repl"][-1] == 0


def _one_request(**policy) -> pa.SimResult:
    # one request at t=0; initial-scale 1 pod ready at t=10 (cold start); served 10..15
    return run(pa.KPAPolicy(target=1, target_utilization=1.0, **policy), trace([0.0], 400), ttft=5.0, cold=10.0)


def test_cold_start_request_latency_includes_the_cold_start():
    res = _one_request()
    assert res.ok == 1
    assert res.cold_start_hits == 1 and res.arrived_at_zero == 1
    assert res.series["ttft"][0] == pytest.approx(10.0 + 5.0)     # waited for the pod, then TTFT 5 s
    assert res.series["e2e"][0] == pytest.approx(15.0)


def test_scale_to_zero_timing_defaults():
    # Concurrency is 1 in seconds 0..14, 0 from 15 on (the pod reports zeros). The stable window (60 buckets
    # ending at the second before the tick) is all zero first at the tick t=76 (buckets 16..75): desired 0.
    # The PA became Active at the first tick with a ready pod (t=12), so at t=76 it has been active 64 s >= 60 s:
    # it goes Inactive at 76. With the default target-burst-capacity 200 the activator has been in the path all
    # along (EBC = 1*100 - 200 < 0), so the grace period is already satisfied: 0 pods at the next tick, t=78.
    res = _one_request()
    assert replicas_at(res, 76.0) == 1
    assert first_tick_with_replicas(res, 0) == 78.0
    assert res.gpu_hours * 3600 == pytest.approx(78.0)


def test_scale_to_zero_waits_for_the_grace_period():
    # target-burst-capacity 0: the activator leaves the path while pods serve; it comes back (SKS proxy mode) at
    # t=76 when the PA goes Inactive, so scale-to-zero-grace-period 30 s keeps the pod until t=106.
    res = _one_request(target_burst_capacity=0)
    assert replicas_at(res, 104.0) == 1
    assert first_tick_with_replicas(res, 0) == 106.0
    res = _one_request(target_burst_capacity=0, scale_to_zero_grace_period=50)
    assert first_tick_with_replicas(res, 0) == 126.0


def test_scale_to_zero_waits_for_the_pod_retention_period():
    # retention 100 s: Inactive at 76, zero once inactive for max(30, 100) = 100 s -> t=176
    res = _one_request(scale_to_zero_pod_retention_period=100)
    assert replicas_at(res, 174.0) == 1
    assert first_tick_with_replicas(res, 0) == 176.0


def test_scale_to_zero_waits_for_scale_down_delay():
    # delay 30 s = 15 ticks: desired was 1 at t=74 (tick index 37), so it stays 1 until index 37 leaves the window
    # at t=104 (indices 38..52); Inactive at 104, zero at 106.
    res = _one_request(scale_down_delay=30)
    assert replicas_at(res, 102.0) == 1
    assert first_tick_with_replicas(res, 0) == 106.0


def test_activator_returns_503_after_timeout_when_no_pod_comes_up():
    # cold start 400 s > request timeout 300 s: the buffered request gets a 503 at t=300
    res = run(pa.KPAPolicy(request_timeout=300), trace([0.0], 600), ttft=1.0, cold=400.0)
    assert res.failures == {"503": 1}
    assert res.ok == 0
    assert res.series["e2e"][0] == pytest.approx(300.0)


def test_activation_from_zero_is_immediate():
    # a request at t=100 after the revision scaled to zero (t=78 above) pokes the autoscaler: a pod is created at
    # t=100 and is ready at 110, so the request finishes at 110 + 5 = 115 (e2e 15 s).
    res = run(pa.KPAPolicy(target=1, target_utilization=1.0), trace([0.0, 100.0], 400), ttft=5.0, cold=10.0)
    assert res.series["e2e"][1] == pytest.approx(15.0)
    assert res.pod_starts == 2


def test_container_concurrency_queues_in_the_activator():
    # cc 1, one pod that never scales (max 1): three requests at t=0 are served one after another (5 s each)
    p = pa.KPAPolicy(container_concurrency=1, max_scale=1, min_scale=1, initial_scale=1)
    res = run(p, trace([20.0, 20.0, 20.0], 200), ttft=5.0, cold=1.0)
    assert sorted(np.round(res.series["e2e"], 6)) == [5.0, 10.0, 15.0]


# ----------------------------------------------------------------------------------------------------------------
# HPA baseline
# ----------------------------------------------------------------------------------------------------------------

def test_hpa_replica_formula_and_tolerance():
    h = pa.HPAController(pa.HPAPolicy(cpu_target=0.7))
    # 2 ready pods at 90 %: ceil(2 * 0.9 / 0.7) = ceil(2.57) = 3
    assert h.recommend([0.9, 0.9], 0, 2) == 3
    # 75 %: ratio 1.07 within the 0.1 tolerance -> unchanged
    assert h.recommend([0.75, 0.75], 0, 2) == 2
    # scale-up with an unready pod counted as 0 %: 1.8 / (0.7 * 3) = 0.857 < 1 -> unchanged
    assert h.recommend([0.9, 0.9], 1, 3) == 3
    # 30 % on 4 pods: ceil(4 * 0.3 / 0.7) = ceil(1.71) = 2
    assert h.recommend([0.3] * 4, 0, 4) == 2


def test_hpa_scale_down_stabilization_and_bounds():
    p = pa.HPAPolicy(cpu_target=0.7, min_replicas=1, max_replicas=8, scale_down_stabilization=300)
    h = pa.HPAController(p)
    h.replicas = 2
    assert h.step(0.0, [1.0, 1.0], 0) == 3                    # ceil(2 * 1.0/0.7) = 3
    # idle from now on: recommendation 1, but the highest recommendation of the last 300 s (3) holds
    for t in np.arange(15.0, 300.1, 15.0):
        assert h.step(float(t), [0.05] * 3, 0) == 3, t
    assert h.step(315.0, [0.05] * 3, 0) == 1                  # t=0 left the window
    # scale-up limit max(2x, +4) per period and max-replicas: from 1 at 10x load -> min(10, 1+4=5) = 5, then 8
    assert h.step(330.0, [7.0], 0) == 5
    assert h.step(345.0, [7.0] * 5, 0) == 8


def test_hpa_on_cpu_never_scales_when_cpu_stays_below_target():
    # a pod whose CPU stays at 50 % whatever the load: HPA at 70 % keeps min replicas (1) under heavy load
    res = run(pa.HPAPolicy(cpu_target=0.7), trace(np.arange(0, 600, 0.5), 600), ttft=10.0, cold=1.0, cpu=0.5)
    assert max(res.series["tick_repl"]) == 1


# ----------------------------------------------------------------------------------------------------------------
# Inputs and CLI
# ----------------------------------------------------------------------------------------------------------------

def test_capacity_file_is_labelled_placeholder_and_loads():
    doc = json.loads((ROOT / "bench" / "capacity.json").read_text())
    assert "source" in doc
    cap = pa.Capacity.load(str(ROOT / "bench" / "capacity.json"))
    if "PLACEHOLDER" in doc["source"].upper():
        assert cap.placeholder
    assert cap.concurrency == sorted(cap.concurrency)
    assert cap.cpu_util is not None


def test_trace_csv_roundtrip(tmp_path):
    cap = pa.Capacity.load(str(ROOT / "bench" / "capacity.json"))
    tr = pa.generate_diurnal(cap, hours=2, peak_rps=0.5, seed=3, start_hour=9)
    assert len(tr.arrivals) > 100 and np.all(np.diff(tr.arrivals) >= 0)
    again = pa.generate_diurnal(cap, hours=2, peak_rps=0.5, seed=3, start_hour=9)
    assert np.array_equal(tr.arrivals, again.arrivals)               # seeded
    f = tmp_path / "t.csv"
    tr.save_csv(str(f))
    back = pa.load_trace(str(f), cap)
    assert np.allclose(back.arrivals, tr.arrivals, atol=1e-3)
    assert np.array_equal(back.output_tokens, tr.output_tokens)
    # arrival-only CSV without header: tokens are drawn from the capacity workload
    g = tmp_path / "u.csv"
    g.write_text("0.5\n1.5\n2.0\n")
    t2 = pa.load_trace(str(g), cap)
    assert list(t2.arrivals) == [0.5, 1.5, 2.0] and len(t2.output_tokens) == 3


def test_cli_quick(tmp_path):
    out_json, out_png, out_md = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "p.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_autoscaling.py"), "--capacity",
                           str(ROOT / "bench" / "capacity.json"), "--generate", "diurnal", "--quick", "--jobs", "1",
                           "--service", "", "--json", str(out_json), "--plot", str(out_png), "--markdown",
                           str(out_md), "--candidate", "cc=8,target=6,min-scale=1,scale-down-delay=300"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "| HPA (guide: CPU 70%) | KPA (Knative defaults) | KPA (candidate 1) | KPA (recommended) |" \
        in proc.stdout
    assert out_png.stat().st_size > 10_000
    doc = json.loads(out_json.read_text())
    assert [s["name"] for s in doc["scenarios"]] == ["HPA (guide: CPU 70%)", "KPA (Knative defaults)",
                                                    "KPA (candidate 1)", "KPA (recommended)"]
    cand = doc["scenarios"][2]["policy"]
    assert (cand["container_concurrency"], cand["target"], cand["min_scale"], cand["scale_down_delay"]) == \
        (8, 6.0, 1, 300.0)
    assert sum(1 for s in doc["grid"] if s.get("recommended")) == 1
    assert doc["recommendation"]["annotations"]["autoscaling.knative.dev/max-scale"] == "8"
    assert len(doc["grid"]) >= 8
    assert "containerConcurrency" in out_md.read_text()


def test_durations_and_service_manifest(tmp_path):
    assert pa.parse_duration("120s") == 120 and pa.parse_duration("5m") == 300
    assert pa.parse_duration("1h30m") == 5400 and pa.parse_duration(45) == 45
    with pytest.raises(ValueError):
        pa.parse_duration("5 minutes")
    f = tmp_path / "svc.yaml"
    f.write_text("""
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: demo}
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/class: kpa.autoscaling.knative.dev
        autoscaling.knative.dev/metric: concurrency
        autoscaling.knative.dev/target: "16"
        autoscaling.knative.dev/target-utilization-percentage: "80"
        autoscaling.knative.dev/min-scale: "0"
        autoscaling.knative.dev/max-scale: "8"
        autoscaling.knative.dev/window: "120s"
        autoscaling.knative.dev/scale-down-delay: "5m"
        autoscaling.knative.dev/scale-to-zero-pod-retention-period: "15m"
        autoscaling.knative.dev/target-burst-capacity: "-1"
        serving.knative.dev/progress-deadline: "1800s"
    spec:
      containerConcurrency: 32
      timeoutSeconds: 600
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: x}
""")
    pol, note = pa.policy_from_service(str(f))
    assert pol is not None and "demo" in note
    assert (pol.container_concurrency, pol.target, pol.max_scale) == (32, 16.0, 8)
    assert pol.resolve_target() == pytest.approx((12.8, 16.0))                # min(16, 32) x 0.8
    assert (pol.stable_window, pol.scale_down_delay, pol.scale_to_zero_pod_retention_period) == (120, 300, 900)
    assert pol.target_burst_capacity == -1 and pol.request_timeout == 600 and pol.progress_deadline == 1800
    ann = pa.annotations(pol)
    assert ann["autoscaling.knative.dev/window"] == "2m" and ann["autoscaling.knative.dev/target"] == "16"
    assert pa.policy_from_service(str(tmp_path / "missing.yaml"))[0] is None


# ----------------------------------------------------------------------------------------------------------------
# Scheduled min-scale (k8s/schedule.yaml)
# ----------------------------------------------------------------------------------------------------------------

def _at(text: str):
    import datetime as dt
    return dt.datetime.fromisoformat(text)


@pytest.mark.parametrize("expr, when, hit", [
    ("0 8 * * 1-5", "2026-01-05T08:00", True),        # Monday
    ("0 8 * * 1-5", "2026-01-05T08:01", False),
    ("0 8 * * 1-5", "2026-01-10T08:00", False),       # Saturday
    ("0 8 * * mon-fri", "2026-01-09T08:00", True),    # Friday, by name
    ("0 20 * * 0", "2026-01-11T20:00", True),         # Sunday as 0 ...
    ("0 20 * * 7", "2026-01-11T20:00", True),         # ... and as 7
    ("*/15 9-17 * * *", "2026-01-07T17:45", True),
    ("*/15 9-17 * * *", "2026-01-07T17:50", False),
    ("30 6 1 jan *", "2026-01-01T06:30", True),
    # both day fields restricted: either matches (Friday the 2nd: a Friday; Tuesday the 13th: the 13th)
    ("0 0 13 * 5", "2026-01-02T00:00", True),
    ("0 0 13 * 5", "2026-01-13T00:00", True),
    ("0 0 13 * 5", "2026-01-14T00:00", False),
    # one restricted, the other *: both must match
    ("0 0 13 * *", "2026-01-02T00:00", False),
    ("5/20 * * * *", "2026-01-02T00:45", True),       # 5, 25, 45
    ("@daily", "2026-01-02T00:00", True),
    ("0 8 ? * 1-5", "2026-01-05T08:00", True),         # ? as * in a day field
])
def test_cron_matches_like_the_cronjob_controller(expr, when, hit):
    assert pa.Cron(expr).matches(_at(when)) is hit


@pytest.mark.parametrize("expr", ["0 8 * *", "60 8 * * *", "0 8 * * 1-9", "0 8 * * fri-mon", "*/0 * * * *",
                                  "0 ? * * *"])
def test_cron_rejects_what_is_not_cron(expr):
    with pytest.raises(ValueError):
        pa.Cron(expr)


def test_schedule_is_read_from_the_cronjobs():
    sched = pa.Schedule.load(str(ROOT / "k8s" / "schedule.yaml"))
    assert sorted(e.min_scale for e in sched.entries) == [0, 1]
    assert len({e.tz for e in sched.entries}) == 1
    from zoneinfo import ZoneInfo
    monday = _at("2026-01-05T00:00").replace(tzinfo=ZoneInfo(sched.tz))
    initial, sw = sched.switches(monday, 7 * 86400)
    # weekdays 08:00 -> 1 and 20:00 -> 0; Friday 20:00 before the Monday set 0
    assert initial == 0
    expected = sorted([(d * 86400 + 8 * 3600.0, 1) for d in range(5)] + [(d * 86400 + 20 * 3600.0, 0) for d in range(5)])
    assert sw == expected
    # a start inside business hours inherits the morning's 1
    initial, sw = sched.switches(monday.replace(hour=9), 3600)
    assert initial == 1 and sw == []


def test_schedule_switch_is_a_new_revision_that_keeps_a_warm_pod():
    # One request at t=1000; min-scale 0 (target 1, one request per pod). Without a schedule: the initial pod
    # (0..10 cold) goes at t=74 (all-zero stable window from its first ready tick 12: inactive at 72, zero at 74),
    # and the request at 1000 waits for a cold start: e2e 10 + 5 = 15 s; that pod goes 78 s later (1000..1078).
    # With min-scale 1 from t=100 and 0 from t=2000: the patch at 100 is revision 2, one pod 100..110; the request is
    # served warm (e2e 5 s); at 2000 revision 3 starts its initial pod (ready 2010), revision 2's pod leaves at the
    # handover (2010), and revision 3's pod scales to zero like the first one, 74 s after its start.
    p = pa.KPAPolicy(target=1, target_utilization=1.0)
    tr = trace([1000.0], 2500)
    plain = run(p, tr, ttft=5.0, cold=10.0)
    sched = pa.Simulator(det_capacity(ttft=5.0, cold=10.0), p, tr, record=True,
                         switches=[(100.0, 1), (2000.0, 0)]).run()
    assert plain.series["e2e"][0] == pytest.approx(15.0) and plain.cold_start_hits == 1
    assert plain.gpu_hours * 3600 == pytest.approx(74 + 78) and plain.revisions == 1
    assert sched.series["e2e"][0] == pytest.approx(5.0) and sched.cold_start_hits == 0
    assert (sched.pod_starts, sched.revisions, sched.max_pods) == (3, 3, 2)
    assert sched.gpu_hours * 3600 == pytest.approx(74 + (2010 - 100) + 74)
    # patching the value the template already has creates no revision and changes nothing
    same = pa.Simulator(det_capacity(ttft=5.0, cold=10.0), p, tr, record=True, switches=[(100.0, 0)]).run()
    assert same.revisions == 1 and same.gpu_hours == pytest.approx(plain.gpu_hours)


def test_old_revision_serves_until_the_new_one_is_ready():
    # min-scale 1 all along (one warm pod); at t=100 a switch to min-scale 2: the new revision's two pods are cold
    # until 110 (cold 10 s). A request at 105 goes to the old revision's ready pod: no cold start, e2e 5 s.
    p = pa.KPAPolicy(target=1, target_utilization=1.0, min_scale=1)
    res = pa.Simulator(det_capacity(ttft=5.0, cold=10.0), p, trace([105.0], 400), record=True,
                       switches=[(100.0, 2)]).run()
    assert res.series["e2e"][0] == pytest.approx(5.0) and res.cold_start_hits == 0 and res.arrived_at_zero == 0
    assert res.max_pods == 3 and res.revisions == 2
    with pytest.raises(ValueError):
        pa.Simulator(det_capacity(), pa.HPAPolicy(), trace([1.0], 10), switches=[(1.0, 1)])


def test_cli_with_schedule(tmp_path):
    out_json = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_autoscaling.py"), "--generate", "diurnal",
                           "--quick", "--jobs", "1", "--no-search", "--schedule", str(ROOT / "k8s" / "schedule.yaml"),
                           "--trace-start", "2026-01-05T07:00", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "| KPA (service.yaml) | KPA (service.yaml + schedule) |" in proc.stdout
    assert "| revisions created | 1 | 1 | 1 | 2 |" in proc.stdout          # the 08:00 switch inside 07:00-10:00
    doc = json.loads(out_json.read_text())
    twin = doc["scenarios"][-1]
    assert twin["switches"] == [[3600.0, 1]] and twin["revisions"] == 2
    assert doc["scenarios"][-2]["gpu_hours"] <= twin["gpu_hours"]       # a warm pod from 08:00 costs GPU time


# ----------------------------------------------------------------------------------------------------------------
# bench/make_capacity.py: the capacity file from the agent-turn bench
# ----------------------------------------------------------------------------------------------------------------

def _agent_bench() -> dict:
    # p95 = p50 * exp(z95) is a log-normal with sigma 1, so p99 = p50 * exp(z99)
    z95, z99 = 1.6448536269514722, 2.3263478740408408
    return {"gpu": "NVIDIA H200", "date": "2026-12-01", "quantization": "bf16",
            "engine": {"max_num_seqs": 32},
            "levels": [
                {"concurrency": 16, "ttft_s": {"p50": 2.0, "p95": 2.0 * np.exp(z95)}, "turn_s": {"p50": 9.0, "p95": 14.0},
                 "turns_per_min": 100.0, "output_tok_s": 800.0},
                {"concurrency": 1, "ttft_s": {"p50": 0.5, "p95": 0.5}, "turn_s": {"p50": 3.0, "p95": 4.0},
                 "turns_per_min": 20.0, "output_tok_s": 40.0, "tpot_s": {"p50": 0.02, "p95": 0.02 * np.exp(z95)}},
            ],
            "cold_start_s": {"samples": [30.0, 40.0]}}, z99


def test_make_capacity_from_the_agent_bench(tmp_path):
    bench, z99 = _agent_bench()
    src = tmp_path / "agent_bench.json"
    src.write_text(json.dumps(bench))
    out = tmp_path / "capacity.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "make_capacity.py"), "--agent-bench", str(src),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert "NVIDIA H200" in doc["source"] and "agent_bench.py" in doc["source"] and not doc["placeholder"]
    assert doc["engine"] == {"max_num_seqs": 32, "max_queue_size": 128, "quantization": "bf16"}
    lo, hi = doc["levels"]                                      # sorted by concurrency
    assert lo["ttft_s"]["p99"] == pytest.approx(0.5) and hi["ttft_s"]["p99"] == pytest.approx(2.0 * np.exp(z99),
                                                                                              rel=1e-3)
    assert lo["tpot_s"]["p99"] == pytest.approx(0.02 * np.exp(z99), rel=1e-3)
    assert hi["tpot_s"]["p50"] == pytest.approx(16 / 800.0) == hi["tpot_s"]["p99"]   # from throughput, no spread
    assert (hi["turns_per_min"], hi["turn_s"]) == (100.0, {"p50": 9.0, "p95": 14.0})
    current = json.loads((ROOT / "bench" / "capacity.json").read_text())
    assert doc["workload"] == current["workload"]               # not in the bench: carried over
    assert all(lv["cpu_util"] is not None for lv in doc["levels"])
    assert doc["cold_start_s"]["samples"] == [45.0, 55.0]       # + the assumed 15 s pod overhead
    # the planner reads it and runs on it
    cap = pa.Capacity.load(str(out))
    assert cap.concurrency == [1.0, 16.0] and cap.ttft_p99[1] == pytest.approx(2.0 * np.exp(z99), rel=1e-3)
    assert (cap.cold_start_p50, cap.max_num_seqs) == (50.0, 32)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_autoscaling.py"), "--capacity", str(out),
                           "--quick", "--no-search", "--jobs", "1"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0 and "MEASURED on one NVIDIA H200" in proc.stdout, proc.stderr


@pytest.mark.parametrize("breakage, message", [
    (lambda b: b.pop("gpu"), "'gpu'"),
    (lambda b: b["levels"][0].pop("turn_s"), "'turn_s'"),
    (lambda b: b["levels"][0].update(ttft_s=1.0), "ttft_s"),
    (lambda b: b["levels"][0].update(output_tok_s=0), "output_tok_s"),
    (lambda b: b.update(cold_start_s={"samples": []}), "cold_start_s"),
])
def test_make_capacity_says_what_is_missing(tmp_path, breakage, message):
    bench, _ = _agent_bench()
    breakage(bench)
    src = tmp_path / "agent_bench.json"
    src.write_text(json.dumps(bench))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "make_capacity.py"), "--agent-bench", str(src),
                           "--out", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "c.json").exists()


def test_make_capacity_reproduces_the_shipped_file(tmp_path):
    """bench/capacity.json is make_capacity's output on the stored H200 agent-bench input (bench/results/)."""
    out = tmp_path / "capacity.json"
    src = ROOT / "bench" / "results" / "h200-2026-12-04-capacity-input-s9.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "make_capacity.py"), "--agent-bench", str(src),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == json.loads((ROOT / "bench" / "capacity.json").read_text())


def test_make_capacity_h100_still_builds(tmp_path):
    out = tmp_path / "capacity.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "make_capacity.py"), "--h100", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "H100" in json.loads(out.read_text())["source"]


# ----------------------------------------------------------------------------------------------------------------
# The README's comparison is the planner's output on the shipped capacity file
# ----------------------------------------------------------------------------------------------------------------

def test_readme_table_is_the_plan_made_from_the_shipped_capacity_file():
    """bench/autoscaling_plan.{md,json} are the planner's output (docs/autoscaling.md has the command); the README
    shows that table, and the plan was made from the capacity file as it is now. A new bench/capacity.json fails
    this until the plan is rerun with --readme README.md."""
    readme = (ROOT / "README.md").read_text()
    plan_md = (ROOT / "bench" / "autoscaling_plan.md").read_text()
    i, j = pa.comparison_table(readme)
    k, m = pa.comparison_table(plan_md)
    assert readme.splitlines()[i:j + 1] == plan_md.splitlines()[k:m + 1]
    plan = json.loads((ROOT / "bench" / "autoscaling_plan.json").read_text())
    capacity = json.loads((ROOT / "bench" / "capacity.json").read_text())
    assert plan["capacity"]["source"] == capacity["source"]
    assert [s["name"] for s in plan["scenarios"]] == [h.strip() for h in readme.splitlines()[i].split("|")[2:-1]]


def test_readme_option_replaces_only_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n| | HPA | old |\n|---|---|\n| meets objective | no |\n\nafter\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_autoscaling.py"), "--quick", "--no-search",
                           "--jobs", "1", "--service", "", "--readme", str(readme)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("intro\n\n| | HPA (guide: CPU 70%) | KPA (Knative defaults) |") and text.endswith(
        "\n\nafter\n")
    i, j = pa.comparison_table(text)
    assert "\n".join(text.splitlines()[i:j + 1]) in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# The package behind the CLI (scripts/autoscaling/)
# ----------------------------------------------------------------------------------------------------------------

def test_cli_module_reexports_the_package():
    import autoscaling
    from autoscaling import cli, simulator
    assert pa.Simulator is simulator.Simulator and pa.main is cli.main
    assert set(autoscaling.__all__) <= set(vars(pa))
    assert pa.REPO_ROOT == ROOT


def test_cli_module_loads_by_path(tmp_path):
    # without scripts/ on sys.path (importlib by file name): the package beside it is found
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('pa', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.KPAPolicy().resolve_target())")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "plan_autoscaling.py")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(70.0, 100.0)"


def test_concurrency_metric_buckets_and_windows():
    m = pa.ConcurrencyMetric((4, 2))
    m.advance(0.5, 0, False)
    m.advance(2.0, 1, False)                # one request in the system from 0.5 s to 2.0 s
    assert m.cum == [0.0, 0.5, 1.5]         # bucket 0 holds 0.5 request-seconds, bucket 1 holds 1
    # two buckets written so far: the windows average over those two, not over 4 (a partial window)
    assert m.window_avg(4, 1) == 0.75 and m.window_avg(2, 1) == 0.75
    m.advance(10.5, 0, False)               # idle at zero pods: no writes, the seconds in between are zero buckets
    assert (m.sec, len(m.cum), m.cum[-1]) == (10, 11, 1.5)
    assert m.window_avg(4, 5) == 0.0        # a whole window after the last write: zero
    assert m.window_avg(4, 9) is None       # more than a window after it: no data, no decision
    # the activator's poke: its stat is the only data in a fresh window
    assert m.with_stat(4, 3) == 3.0


def test_concurrency_metric_ready_pod_writes_zero_buckets():
    m = pa.ConcurrencyMetric((2,))
    m.advance(1.5, 0, True)                 # bucket 0 closes before the pod was seen in it: not written
    assert m.window_avg(2, 0) is None
    m.advance(2.5, 0, True)                 # bucket 1 saw a ready pod: written, with 0 requests
    assert m.window_avg(2, 1) == 0.0


def test_pod_retire_and_drain():
    from autoscaling.simulator import POD_GONE, POD_TERMINATING
    idle = pa.Pod(0, 0.0, 10.0)
    idle.retire(3.0)
    assert (idle.state, idle.gone_at) == (POD_GONE, 3.0)
    busy = pa.Pod(1, 0.0, 10.0)
    busy.active = 1
    busy.retire(5.0)
    assert busy.state == POD_TERMINATING and busy.gone_at == float("inf")    # drains first
    busy.active = 0
    busy.drained(7.0)
    assert (busy.state, busy.gone_at) == (POD_GONE, 7.0)                    # GPU time ends when it has drained
