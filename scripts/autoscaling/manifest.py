"""KPA settings from text: a --candidate "cc=8,target=6,..." column, and the revision template of a Knative Service
manifest (service.yaml)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from .policies import KPAPolicy
from .units import parse_duration


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
