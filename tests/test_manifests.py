"""The deployment files, checked without a cluster: service.yaml and k8s/*.yaml, func.yaml and the Dockerfile.

* Every manifest parses; the core-Kubernetes objects (PVC, Job, Deployment, Service, NetworkPolicy, and each Knative
  Service's pod template turned into a Pod) validate with kubernetes-validate, strict, against pinned Kubernetes
  versions.
* Knative Serving's own admission rules, re-implemented from its webhook (pkg/apis/serving/k8s_validation.go,
  fieldmask.go, metadata_validation.go, v1/revision_validation.go; pkg/apis/autoscaling/annotation_validation.go and
  register.go): which PodSpec/Container fields are allowed and which need a config-features flag, ports, probes,
  volumes, reserved names, autoscaling keys (only on the revision template, known keys, ranges), containerConcurrency
  and timeoutSeconds limits. The checker itself is tested on broken manifests below.
* Knative Eventing: Broker/Trigger shapes (schemas written from eventing.knative.dev/v1 types) and DeliverySpec rules.
* The autoscaling numbers as relations (target <= containerConcurrency <= engine slots + queue, progress-deadline
  above the startup window plus image pull and node provisioning, ...), not as magic numbers.
* Image pre-pull (k8s/prepull.yaml): lands on exactly the nodes the Service's pods can (a small scheduling
  predicate over provider-like nodes), pulls the Service's image with a no-op, asks for no GPU.
* Scheduled scaling (k8s/schedule.yaml): the CronJobs' patch applied to the Service is still a valid Service that
  differs only in min-scale, and their RBAC allows exactly that patch (a small RBAC authorizer).
* Consistency with the app: env names from function.config.ENV_VARS and values that Config accepts, the port from
  func_python.sock's default LISTEN_ADDRESS, probe paths answered by func-python's own server, cache paths on the
  volume, CloudEvent types, and the same values in service.yaml, func.yaml, the Job and the Dockerfile.
"""
from __future__ import annotations

import ast
import asyncio
import datetime as dt
import json
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

import func_python.http
import func_python.sock
from function.config import ENV_VARS, Config

ROOT = Path(__file__).resolve().parents[1]
SERVICE_YAML = ROOT / "service.yaml"
MANIFEST_FILES = [SERVICE_YAML, *sorted((ROOT / "k8s").glob("*.yaml"))]
FUNC_YAML = ROOT / "func.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Kubernetes versions the core objects are validated against: the oldest one kubernetes-validate ships that Knative
# Serving releases with startupProbe support (>= 1.15) run on, and the newest it ships.
K8S_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]

# Environment variables that are not the app's settings but are read by libraries and tools in the image.
STANDARD_ENV = {
    "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF",
    "LISTEN_ADDRESS", "PYTHONUNBUFFERED", "HOME", "MALLOC_MMAP_THRESHOLD_",
}
# Set only while building the image (or by the base image's toolchain), never read by the app.
BUILD_ENV = {"VIRTUAL_ENV", "PATH", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "PYTHONDONTWRITEBYTECODE"}

# Cold-start budget (seconds) the manifests must cover. Assumptions until bench/RESULTS.md has measurements; when it
# does, set CONTAINER_COLD_START_S to about twice the worst measured container start -> ready time.
CONTAINER_COLD_START_S = 600   # container start -> ready: weights from the PVC, CUDA graphs, warmup (or quantizing)
IMAGE_PULL_S = 300             # ~4.4 GB to pull, ~8 GB to unpack (docs/image.md), on a node without it
NODE_PROVISION_S = 600         # a cluster autoscaler adding a GPU node

# Knative Serving defaults (config-defaults / config-autoscaler) the manifests must fit without cluster changes.
MAX_REVISION_TIMEOUT_SECONDS = 600
CONTAINER_CONCURRENCY_MAX_LIMIT = 1000
MAX_SCALE_LIMIT = 0            # config-autoscaler max-scale-limit: 0 = none by default


# =================================================================================================================
# Loading
# =================================================================================================================

class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings (func.yaml's `created`, as Go's YAML reads it)."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != "tag:yaml.org,2002:timestamp"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


DOCS: list[tuple[Path, dict]] = [(p, d) for p in MANIFEST_FILES for d in load_docs(p)]
FUNC: dict = yaml.load(FUNC_YAML.read_text(), Loader=_Loader)


def is_knative(doc: dict) -> bool:
    return ".knative.dev/" in doc.get("apiVersion", "")


def find(kind: str, name: str | None = None, api: str | None = None) -> list[dict]:
    return [d for _, d in DOCS if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
            and (api is None or d.get("apiVersion", "").startswith(api))]


def one(kind: str, name: str, api: str | None = None) -> dict:
    found = find(kind, name, api)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


KSVCS = find("Service", api="serving.knative.dev/")
MODEL = one("Service", FUNC["name"], "serving.knative.dev/")
FRONT = one("Service", f"{FUNC['name']}-cache", "serving.knative.dev/")
JOB = one("Job", "autoglm-prequantize", "batch/")
PREPULL = one("DaemonSet", "autoglm-prepull", "apps/")


def template(ksvc: dict) -> dict:
    return ksvc["spec"]["template"]


def annotations(ksvc: dict) -> dict[str, str]:
    return template(ksvc).get("metadata", {}).get("annotations", {})


def container(ksvc: dict) -> dict:
    (c,) = template(ksvc)["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def mounts_of(pod_spec: dict, c: dict) -> dict[str, dict]:
    """mountPath -> volume source of each mount of container `c`."""
    vols = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return {m["mountPath"]: vols[m["name"]] for m in c.get("volumeMounts", [])}


def pvc_mount_paths(pod_spec: dict, c: dict) -> list[str]:
    return [p for p, v in mounts_of(pod_spec, c).items() if "persistentVolumeClaim" in v]


def under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def app_config(c: dict) -> Config:
    return Config.from_env(env_of(c))


# =================================================================================================================
# Durations
# =================================================================================================================

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(s: str) -> float:
    """Seconds in a Go time.ParseDuration string ("120s", "5m", "1h30m"); ValueError if it is not one."""
    if s in ("0", "+0", "-0"):
        return 0.0
    m = re.fullmatch(r"([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+", s)
    if not m:
        raise ValueError(f"not a Go duration: {s!r}")
    total = sum(float(n) * _GO_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", s))
    return -total if m.group(1) == "-" else total


def iso8601_duration(s: str) -> float:
    """Seconds in an ISO 8601 duration as Knative Eventing accepts them ("PT10M", "PT5S", "P1DT2H")."""
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", s)
    if not m or s in ("P", "PT") or s.endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {s!r}")
    d, h, mi, sec = (float(x) if x else 0.0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + sec


def test_duration_parsers():
    assert go_duration("120s") == 120 and go_duration("5m") == 300 and go_duration("1h30m") == 5400
    assert iso8601_duration("PT10M") == 600 and iso8601_duration("PT5S") == 5 and iso8601_duration("P1DT1H") == 90000
    for bad in ("5", "5 m", "m5"):
        with pytest.raises(ValueError):
            go_duration(bad)
    for bad in ("10M", "PT", "P"):
        with pytest.raises(ValueError):
            iso8601_duration(bad)


# =================================================================================================================
# Knative Serving's admission rules
# =================================================================================================================

AUTOSCALING = "autoscaling.knative.dev/"
# Current kebab-case keys, and the camelCase ones Knative still accepts (kmap.KeyPriority in register.go).
AUTOSCALING_KEYS = {AUTOSCALING + k for k in (
    "class", "metric", "target", "target-utilization-percentage", "target-burst-capacity", "min-scale", "max-scale",
    "initial-scale", "activation-scale", "scale-down-delay", "window", "panic-window-percentage",
    "panic-threshold-percentage", "scale-to-zero-pod-retention-period", "metric-aggregation-algorithm",
    "minScale", "maxScale", "initialScale", "scaleDownDelay", "targetUtilizationPercentage", "targetBurstCapacity",
    "panicWindowPercentage", "panicThresholdPercentage", "scaleToZeroPodRetentionPeriod",
)}
SERVING_ANNOTATIONS = {"serving.knative.dev/progress-deadline", "serving.knative.dev/rollout-duration",
                       "queue.sidecar.serving.knative.dev/cpu-resource-request",
                       "queue.sidecar.serving.knative.dev/memory-resource-request",
                       "queue.sidecar.serving.knative.dev/resource-percentage"}
KPA, HPA = "kpa.autoscaling.knative.dev", "hpa.autoscaling.knative.dev"

# fieldmask.go: fields of a revision's PodSpec; None = always allowed, else the config-features flag it needs.
PODSPEC_FIELDS: dict[str, str | None] = {
    "serviceAccountName": None, "containers": None, "volumes": None, "imagePullSecrets": None,
    "enableServiceLinks": None, "automountServiceAccountToken": None,
    "affinity": "kubernetes.podspec-affinity", "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector", "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations", "securityContext": "kubernetes.podspec-securitycontext",
    "priorityClassName": "kubernetes.podspec-priorityclassname", "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "dnsPolicy": "kubernetes.podspec-dnspolicy", "dnsConfig": "kubernetes.podspec-dnsconfig",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
}
REVISION_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
# startupProbe: allowed since Knative Serving 1.15.
CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                    "livenessProbe", "readinessProbe", "startupProbe", "ports", "resources", "securityContext",
                    "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
SECURITY_CONTEXT_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                           "allowPrivilegeEscalation", "seccompProfile"}
PROBE_FIELDS = {"httpGet", "tcpSocket", "exec", "grpc", "initialDelaySeconds", "timeoutSeconds", "periodSeconds",
                "successThreshold", "failureThreshold"}
PROBE_HANDLERS = {"httpGet": {"host", "path", "scheme", "httpHeaders", "port"}, "tcpSocket": {"host", "port"},
                  "exec": {"command"}, "grpc": {"port", "service"}}
VOLUME_SOURCES: dict[str, str | None] = {
    "secret": None, "configMap": None, "projected": None,
    "emptyDir": "kubernetes.podspec-volumes-emptydir",          # enabled by default
    "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
    "hostPath": "kubernetes.podspec-volumes-hostpath", "csi": "kubernetes.podspec-volumes-csi",
}
DEFAULT_ENABLED_FLAGS = {"kubernetes.podspec-volumes-emptydir", "multi-container"}
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_PORTS = {8012, 8013, 8022, 8008, 9090, 9091}   # queue-proxy, metrics, profiling
RESERVED_MOUNTS = {"/", "/dev", "/dev/log"}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
IMAGE_REF = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[\w][\w.-]{0,127})?"
                       r"(@sha256:[0-9a-f]{64})?$")


def _int(v: str) -> int:
    if not re.fullmatch(r"-?\d+", v):
        raise ValueError(v)
    return int(v)


def autoscaling_errors(anns: dict[str, str]) -> list[str]:
    """pkg/apis/autoscaling/annotation_validation.go ValidateAnnotations, for the cluster defaults."""
    errs: list[str] = []

    def get(key: str) -> str | None:
        camel = re.sub(r"-(\w)", lambda m: m.group(1).upper(), key)
        for k in (AUTOSCALING + key, AUTOSCALING + camel):
            if k in anns:
                return anns[k]
        return None

    cls = get("class") or KPA
    if cls.endswith(".knative.dev") and cls not in (KPA, HPA):
        errs.append(f"class {cls!r} is not {KPA} or {HPA}")
    lo = hi = 0
    for key in ("min-scale", "max-scale"):
        v = get(key)
        if v is not None:
            try:
                n = _int(v)
                assert 0 <= n <= 2**31 - 1
            except (ValueError, AssertionError):
                errs.append(f"{key}={v!r} is not an integer >= 0")
                continue
            lo, hi = (n, hi) if key == "min-scale" else (lo, n)
    if hi and hi < lo:
        errs.append(f"max-scale={hi} is less than min-scale={lo}")
    if get("max-scale") is not None and MAX_SCALE_LIMIT and not 1 <= hi <= MAX_SCALE_LIMIT:
        errs.append(f"max-scale={hi} outside [1, max-scale-limit={MAX_SCALE_LIMIT}]")
    if (v := get("activation-scale")) is not None:
        try:
            n = _int(v)
            if lo > n or (hi and hi < n) or n < 2:
                errs.append(f"activation-scale={n} must be in [max(min-scale, 2), max-scale]")
        except ValueError:
            errs.append(f"activation-scale={v!r} is not an integer")
    for key, lo_f, hi_f in (("panic-window-percentage", 1.0, 100.0), ("panic-threshold-percentage", 110.0, 1000.0),
                            ("target-utilization-percentage", 1.0, 100.0), ("target", 0.01, float("inf"))):
        if (v := get(key)) is not None:
            try:
                f = float(v)
            except ValueError:
                errs.append(f"{key}={v!r} is not a number")
                continue
            if not lo_f <= f <= hi_f:
                errs.append(f"{key}={v} outside [{lo_f}, {hi_f}]")
    if (v := get("target-burst-capacity")) is not None:
        try:
            f = float(v)
            if f < 0 and f != -1:
                errs.append(f"target-burst-capacity={v} must be >= 0 or -1")
        except ValueError:
            errs.append(f"target-burst-capacity={v!r} is not a number")
    for key, lo_d in (("window", 6.0), ("scale-down-delay", 0.0), ("scale-to-zero-pod-retention-period", 0.0)):
        if (v := get(key)) is not None:
            try:
                d = go_duration(v)
            except ValueError:
                errs.append(f"{key}={v!r} is not a duration")
                continue
            if not lo_d <= d <= 3600:
                errs.append(f"{key}={v} outside [{lo_d:g}s, 1h]")
            elif key != "scale-to-zero-pod-retention-period" and d != int(d):
                errs.append(f"{key}={v} must have at most second precision")
    if (v := get("metric")) is not None and cls == KPA and v not in ("concurrency", "rps"):
        errs.append(f"metric {v!r} is not concurrency or rps for the KPA")
    if (v := get("metric-aggregation-algorithm")) is not None and cls == KPA and v not in (
            "linear", "weightedExponential", "weighted-exponential"):
        errs.append(f"metric-aggregation-algorithm {v!r} is unknown")
    if (v := get("initial-scale")) is not None:
        try:
            n = _int(v)
            if n < 0:
                errs.append("initial-scale must be >= 0")
            elif n == 0:
                errs.append("initial-scale=0 needs allow-zero-initial-scale in config-autoscaler")
        except ValueError:
            errs.append(f"initial-scale={v!r} is not an integer")
    return errs


def _probe_errors(where: str, p: dict, port: dict, readiness: bool) -> list[str]:
    errs = [f"{where}: field {k} not allowed" for k in p if k not in PROBE_FIELDS]
    handlers = [h for h in PROBE_HANDLERS if h in p]
    if len(handlers) != 1:
        errs.append(f"{where}: exactly one of httpGet, tcpSocket, exec, grpc (got {handlers})")
    for h in handlers:
        errs += [f"{where}.{h}: field {k} not allowed" for k in p[h] if k not in PROBE_HANDLERS[h]]
        probe_port = p[h].get("port")
        if isinstance(probe_port, str) and probe_port != port.get("name", "http"):
            errs.append(f"{where}.{h}.port {probe_port!r} must match the container port's name")
        if isinstance(probe_port, int) and probe_port != port.get("containerPort", 8080):
            errs.append(f"{where}.{h}.port {probe_port} must be the container port {port.get('containerPort', 8080)}")
    if readiness:
        period = p.get("periodSeconds", 0)
        if period == 0:
            errs += [f"{where}: {k} is disallowed when periodSeconds is zero"
                     for k in ("failureThreshold", "timeoutSeconds") if p.get(k)]
        else:
            if p.get("timeoutSeconds", 1) < 1 or p.get("failureThreshold", 3) < 1:
                errs.append(f"{where}: timeoutSeconds and failureThreshold must be >= 1")
        if p.get("successThreshold", 1) < 1:
            errs.append(f"{where}: successThreshold must be >= 1")
    elif p.get("successThreshold", 1) != 1:
        errs.append(f"{where}: successThreshold must be 1 (Kubernetes) for liveness and startup probes")
    return errs


def knative_service_check(ksvc: dict) -> tuple[list[str], set[str]]:
    """Errors the Knative Serving webhook would return for this Service, and the config-features flags it needs."""
    errs: list[str] = []
    flags: set[str] = set()
    name = ksvc.get("metadata", {}).get("name", "")
    if ksvc.get("apiVersion") != "serving.knative.dev/v1" or ksvc.get("kind") != "Service":
        errs.append("not a serving.knative.dev/v1 Service")
    # A revision is named <service>-00001, which must still be a DNS-1035 label of at most 63 characters.
    if not DNS1035_LABEL.match(name) or len(name) > 63 - len("-00001"):
        errs.append(f"metadata.name {name!r} must be a DNS-1035 label of at most 57 characters")
    errs += [f"metadata.annotations: {k}: autoscaling annotations must be put under "
             f"spec.template.metadata.annotations" for k in ksvc["metadata"].get("annotations", {})
             if k.startswith(AUTOSCALING)]
    spec = ksvc.get("spec", {})
    errs += [f"spec.{k} not allowed" for k in spec if k not in ("template", "traffic")]
    tmpl = spec.get("template", {})
    meta = tmpl.get("metadata", {})
    errs += [f"spec.template.metadata.{k} not allowed" for k in meta
             if k not in ("labels", "annotations", "name", "generateName")]
    errs += [f"label {k} is reserved" for k in meta.get("labels", {}) if k.startswith("serving.knative.dev/")]
    anns = meta.get("annotations", {})
    for k, v in anns.items():
        if not isinstance(v, str):
            errs.append(f"annotation {k}: value {v!r} must be a string (quote it)")
        if k.startswith(AUTOSCALING) and k not in AUTOSCALING_KEYS:
            errs.append(f"unknown autoscaling annotation {k}")
        if k.startswith(("serving.knative.dev/", "queue.sidecar.serving.knative.dev/")) and k not in SERVING_ANNOTATIONS:
            errs.append(f"unknown serving annotation {k}")
    errs += autoscaling_errors({k: str(v) for k, v in anns.items()})
    for k in ("serving.knative.dev/progress-deadline", "serving.knative.dev/rollout-duration"):
        if k in anns:
            try:
                d = go_duration(str(anns[k]))
                if d <= 0 or d != int(d):
                    errs.append(f"{k}={anns[k]} must be positive, at second precision")
            except ValueError:
                errs.append(f"{k}={anns[k]!r} is not a duration")

    ps = tmpl.get("spec", {})
    for k in ps:
        if k in REVISION_FIELDS:
            continue
        if k not in PODSPEC_FIELDS:
            errs.append(f"spec.template.spec.{k} not allowed in a Knative revision")
        elif PODSPEC_FIELDS[k]:
            flags.add(PODSPEC_FIELDS[k])
    if ps.get("automountServiceAccountToken") is True:
        errs.append("automountServiceAccountToken may only be set to false")
    cc = ps.get("containerConcurrency")
    if cc is not None and not (isinstance(cc, int) and 0 <= cc <= CONTAINER_CONCURRENCY_MAX_LIMIT):
        errs.append(f"containerConcurrency {cc!r} outside [0, {CONTAINER_CONCURRENCY_MAX_LIMIT}]")
    timeout = ps.get("timeoutSeconds")
    if timeout is not None and not (isinstance(timeout, int) and 0 <= timeout <= MAX_REVISION_TIMEOUT_SECONDS):
        errs.append(f"timeoutSeconds {timeout!r} outside [0, {MAX_REVISION_TIMEOUT_SECONDS}]")
    for k in ("responseStartTimeoutSeconds", "idleTimeoutSeconds"):
        if k in ps and not 0 <= ps[k] <= (timeout or MAX_REVISION_TIMEOUT_SECONDS):
            errs.append(f"{k} must be within timeoutSeconds")

    containers = ps.get("containers", [])
    if len(containers) != 1:
        if not containers:
            errs.append("spec.template.spec.containers is required")
        flags.add("multi-container")
    ports = [(c, p) for c in containers for p in c.get("ports", [])]
    if len(ports) > 1:
        errs.append("more than one container port is set (only a single port is allowed across all containers)")
    port = ports[0][1] if ports else {"containerPort": 8080}
    if ports:
        errs += [f"ports: field {k} not allowed" for k in port if k not in ("containerPort", "name", "protocol")]
        if port.get("name", "") not in ("", "h2c", "http1"):
            errs.append(f"port name {port.get('name')!r} must be empty, h2c or http1")
        if port.get("protocol", "TCP") != "TCP":
            errs.append("port protocol must be TCP")
        if port.get("containerPort") in RESERVED_PORTS or not 0 < port.get("containerPort", 0) < 65536:
            errs.append(f"containerPort {port.get('containerPort')} is reserved or out of range")

    volumes = {}
    for v in ps.get("volumes", []):
        vname = v.get("name", "")
        if vname in volumes:
            errs.append(f"duplicate volume name {vname!r}")
        if not DNS1123_LABEL.match(vname):
            errs.append(f"volume name {vname!r} is not a DNS-1123 label")
        volumes[vname] = v
        sources = [s for s in v if s != "name"]
        if len(sources) != 1:
            errs.append(f"volume {vname}: exactly one source (got {sources})")
        for s in sources:
            if s not in VOLUME_SOURCES:
                errs.append(f"volume {vname}: source {s} not allowed")
                continue
            if VOLUME_SOURCES[s]:
                flags.add(VOLUME_SOURCES[s])
            if s == "persistentVolumeClaim" and not v[s].get("readOnly", False):
                flags.add("kubernetes.podspec-persistent-volume-write")
            if s == "emptyDir":
                errs += [f"volume {vname}: emptyDir.{k} not allowed" for k in v[s] if k not in ("medium", "sizeLimit")]
                if v[s].get("medium", "") not in ("", "Memory"):
                    errs.append(f"volume {vname}: emptyDir.medium must be empty or Memory")
    mounted = set()
    for c in containers:
        where = f"container {c.get('name', '')}"
        errs += [f"{where}: field {k} not allowed" for k in c if k not in CONTAINER_FIELDS]
        if c.get("name") == "queue-proxy":
            errs.append("container name queue-proxy is reserved")
        image = c.get("image", "")
        if not image or not IMAGE_REF.match(image):
            errs.append(f"{where}: image {image!r} is not an image reference")
        for e in c.get("env", []):
            errs += [f"{where}: env {e.get('name')}: field {k} not allowed" for k in e
                     if k not in ("name", "value", "valueFrom")]
            if e.get("name") in RESERVED_ENV:
                errs.append(f"{where}: {e['name']!r} is a reserved environment variable")
            if "value" in e and not isinstance(e["value"], str):
                errs.append(f"{where}: env {e['name']}: value {e['value']!r} must be a string (quote it)")
            for k in e.get("valueFrom", {}):
                if k in ("fieldRef", "resourceFieldRef"):
                    flags.add("kubernetes.podspec-fieldref")
                elif k not in ("configMapKeyRef", "secretKeyRef"):
                    errs.append(f"{where}: env {e['name']}: valueFrom.{k} not allowed")
        for probe, readiness in (("livenessProbe", False), ("readinessProbe", True), ("startupProbe", False)):
            if probe in c:
                errs += _probe_errors(f"{where}.{probe}", c[probe], port, readiness)
        sc = c.get("securityContext", {})
        errs += [f"{where}: securityContext.{k} not allowed" for k in sc if k not in SECURITY_CONTEXT_FIELDS]
        if "add" in sc.get("capabilities", {}):
            flags.add("kubernetes.containerspec-addcapabilities")
        errs += [f"{where}: capabilities.drop must spell ALL in capitals"
                 for d in sc.get("capabilities", {}).get("drop", []) if d.lower() == "all" and d != "ALL"]
        errs += [f"{where}: resources.{k} not allowed" for k in c.get("resources", {}) if k not in ("limits", "requests")]
        seen = set()
        for m in c.get("volumeMounts", []):
            errs += [f"{where}: volumeMount field {k} not allowed" for k in m
                     if k not in ("name", "readOnly", "mountPath", "subPath")]
            vol = volumes.get(m.get("name"))
            if vol is None:
                errs.append(f"{where}: volumeMount {m.get('name')!r} has no matching volume")
                continue
            mounted.add(m["name"])
            path = m.get("mountPath", "")
            clean = re.sub(r"/+$", "", path) or "/"
            if not path.startswith("/") or clean in RESERVED_MOUNTS or clean in seen:
                errs.append(f"{where}: mountPath {path!r} is reserved, relative or not unique")
            seen.add(clean)
            if "emptyDir" not in vol and "persistentVolumeClaim" not in vol and not m.get("readOnly"):
                errs.append(f"{where}: volume mount {m['name']} should be readOnly for this type of volume")
            if vol.get("persistentVolumeClaim", {}).get("readOnly") and not m.get("readOnly"):
                errs.append(f"{where}: volume {m['name']} is readOnly but volume mount is not")
    errs += [f"volume {v!r} not mounted" for v in volumes if v not in mounted]
    return errs, flags


def pod_from_ksvc(ksvc: dict) -> dict:
    """The Pod a revision of this Knative Service becomes, for kubernetes-validate (Knative-only fields dropped)."""
    tmpl = json.loads(json.dumps(template(ksvc)))     # a deep copy: callers may change the Pod
    spec = {k: v for k, v in tmpl["spec"].items() if k not in REVISION_FIELDS}
    spec["containers"] = [{"name": "user-container", **c} for c in spec["containers"]]
    # Knative's defaulting (v1 revision_defaults.go): probes without a port probe the container port.
    for c in spec["containers"]:
        port = next((p["containerPort"] for p in c.get("ports", [])), 8080)
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for handler in ("httpGet", "tcpSocket"):
                if handler in c.get(probe, {}):
                    c[probe][handler].setdefault("port", port)
    meta = {"name": ksvc["metadata"]["name"] + "-00001-deployment",
            **{k: v for k, v in tmpl.get("metadata", {}).items() if k in ("labels", "annotations")}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def k8s_errors(doc: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return str(e).splitlines()[0] + " at " + "/".join(map(str, e.path))
    return None


def required_serving_flags() -> set[str]:
    flags: set[str] = set()
    for ksvc in KSVCS:
        flags |= knative_service_check(ksvc)[1]
    return flags - DEFAULT_ENABLED_FLAGS


# =================================================================================================================
# Parsing and Kubernetes schemas
# =================================================================================================================

def test_every_manifest_parses_and_is_namespace_free():
    assert {p.name for p in MANIFEST_FILES} >= {"service.yaml", "prequantize-job.yaml", "eventing.yaml",
                                                "cache-front.yaml", "config-features.yaml"}
    for path, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert DNS1123_LABEL.match(doc["metadata"]["name"]) or "." in doc["metadata"]["name"], path
        # Everything but the cluster-admin ConfigMap patches goes into the namespace chosen with -n.
        if path.name != "config-features.yaml":
            assert "namespace" not in doc["metadata"], f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"


def test_service_yaml_starts_with_the_knative_service():
    """`kn service create --filename service.yaml` reads the first document only."""
    first = load_docs(SERVICE_YAML)[0]
    assert first is MODEL or first == MODEL
    assert {d["kind"] for d in load_docs(SERVICE_YAML)} == {"Service", "PersistentVolumeClaim"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kubernetes_objects_validate(version):
    core = [(p, d) for p, d in DOCS if not is_knative(d)]
    assert {d["kind"] for _, d in core} >= {"PersistentVolumeClaim", "Job", "Deployment", "Service", "NetworkPolicy"}
    errors = [f"{p.name}: {d['kind']}/{d['metadata']['name']}: {err}"
              for p, d in core if (err := k8s_errors(d, version))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", [k["metadata"]["name"] for k in KSVCS])
def test_knative_pod_templates_validate_as_pods(name, version):
    err = k8s_errors(pod_from_ksvc(one("Service", name, "serving.knative.dev/")), version)
    assert err is None, err


def test_kubernetes_validate_catches_errors():
    pod = pod_from_ksvc(MODEL)
    pod["spec"]["containers"][0]["resources"]["limitz"] = {}
    assert k8s_errors(pod, K8S_VERSIONS[0])


# =================================================================================================================
# Knative Serving rules
# =================================================================================================================

@pytest.mark.parametrize("name", [k["metadata"]["name"] for k in KSVCS])
def test_knative_services_pass_servings_validation(name):
    errs, _ = knative_service_check(one("Service", name, "serving.knative.dev/"))
    assert not errs, "\n".join(errs)


def _broken(mutate) -> list[str]:
    ksvc = json.loads(json.dumps(MODEL))
    mutate(ksvc)
    return knative_service_check(ksvc)[0]


@pytest.mark.parametrize("mutate, expected", [
    (lambda k: k["metadata"].setdefault("annotations", {}).update({AUTOSCALING + "min-scale": "0"}),
     "must be put under"),
    (lambda k: annotations(k).update({AUTOSCALING + "window": "5s"}), "window"),
    (lambda k: annotations(k).update({AUTOSCALING + "window": "90500ms"}), "second precision"),
    (lambda k: annotations(k).update({AUTOSCALING + "scale-down-delay": "2h"}), "scale-down-delay"),
    (lambda k: annotations(k).update({AUTOSCALING + "panic-threshold-percentage": "100"}), "panic-threshold"),
    (lambda k: annotations(k).update({AUTOSCALING + "max-scale": "0", AUTOSCALING + "min-scale": "2"}), None),
    (lambda k: annotations(k).update({AUTOSCALING + "max-scale": "1", AUTOSCALING + "min-scale": "2"}), "max-scale"),
    (lambda k: annotations(k).update({AUTOSCALING + "maxscale": "1"}), "unknown autoscaling"),
    (lambda k: annotations(k).update({AUTOSCALING + "metric": "cpu"}), "metric"),
    (lambda k: annotations(k).update({AUTOSCALING + "initial-scale": "0"}), "allow-zero-initial-scale"),
    (lambda k: annotations(k).update({AUTOSCALING + "target": 16}), "must be a string"),
    (lambda k: annotations(k).update({"serving.knative.dev/progress-deadline": "30"}), "progress-deadline"),
    (lambda k: template(k)["spec"].update(timeoutSeconds=900), "timeoutSeconds"),
    (lambda k: template(k)["spec"].update(containerConcurrency=5000), "containerConcurrency"),
    (lambda k: template(k)["spec"].update(hostNetwork=True), "hostNetwork"),
    (lambda k: template(k)["spec"].update(securityContext={"fsGroup": 1}), None),
    (lambda k: container(k).update(lifecycle={}), "lifecycle"),
    (lambda k: container(k)["ports"].append({"containerPort": 9000}), "single port"),
    (lambda k: container(k)["ports"][0].update(name="http"), "port name"),
    (lambda k: container(k)["ports"][0].update(containerPort=8012), "reserved"),
    (lambda k: container(k)["env"].append({"name": "K_SERVICE", "value": "x"}), "reserved environment"),
    (lambda k: container(k)["readinessProbe"].update(failureThreshold=3), "periodSeconds is zero"),
    (lambda k: container(k)["livenessProbe"]["httpGet"].update(port=9000), "container port"),
    (lambda k: container(k)["securityContext"].update(privileged=True), "privileged"),
    (lambda k: container(k)["volumeMounts"].append({"name": "tmp", "mountPath": "/dev"}), "reserved"),
    (lambda k: template(k)["spec"]["volumes"].append({"name": "unused", "emptyDir": {}}), "not mounted"),
    (lambda k: template(k)["spec"]["volumes"][1]["emptyDir"].update(medium="HugePages"), "medium"),
])
def test_knative_checker_rejects_what_the_webhook_rejects(mutate, expected):
    errs = _broken(mutate)
    if expected is None:     # accepted by the validation (maybe with a feature flag), not an error
        assert not errs, errs
    else:
        assert any(expected in e for e in errs), errs


def test_feature_flags_needed_are_exactly_the_documented_ones():
    flags = required_serving_flags()
    assert flags == {"kubernetes.podspec-nodeselector", "kubernetes.podspec-tolerations",
                     "kubernetes.podspec-persistent-volume-claim", "kubernetes.podspec-persistent-volume-write"}
    serving_patch = next(d for p, d in DOCS if p.name == "config-features.yaml"
                         and d["metadata"]["namespace"] == "knative-serving")
    assert set(serving_patch["data"]) == flags and set(serving_patch["data"].values()) == {"enabled"}
    eventing_patch = next(d for p, d in DOCS if p.name == "config-features.yaml"
                          and d["metadata"]["namespace"] == "knative-eventing")
    assert set(eventing_patch["data"]) == required_eventing_flags()
    docs = (ROOT / "docs" / "deploy.md").read_text()
    header = SERVICE_YAML.read_text()
    for flag in flags | required_eventing_flags():
        assert flag in docs, f"docs/deploy.md does not mention {flag}"
    for flag in flags:
        assert flag in header, f"service.yaml's header does not mention {flag}"


# =================================================================================================================
# Autoscaling numbers: relations
# =================================================================================================================

def _ann_num(ksvc: dict, key: str) -> float:
    return float(annotations(ksvc)[AUTOSCALING + key])


def startup_window_s(c: dict) -> float:
    p = c["startupProbe"]
    return p.get("initialDelaySeconds", 0) + p.get("periodSeconds", 10) * p.get("failureThreshold", 3)


def test_model_autoscaling_relations():
    cfg = app_config(container(MODEL))
    cc = template(MODEL)["spec"]["containerConcurrency"]
    target = _ann_num(MODEL, "target")
    utilization = _ann_num(MODEL, "target-utilization-percentage")
    anns = annotations(MODEL)
    assert anns[AUTOSCALING + "class"] == KPA and anns[AUTOSCALING + "metric"] == "concurrency"
    # Soft target below the hard limit, and the effective target (target x utilization) too.
    assert 0 < target <= cc and target * utilization / 100 <= cc
    # The hard limit never admits more than the engine holds (batch slots + its queue): no 429s for admitted traffic,
    # and the soft target is within the batch.
    assert 1 <= cc <= cfg.max_num_seqs + cfg.queue_limit
    assert target <= cfg.max_num_seqs
    # Scale to zero, a bounded number of GPUs, and a first pod per revision.
    lo, hi, init = (int(_ann_num(MODEL, k)) for k in ("min-scale", "max-scale", "initial-scale"))
    assert lo == 0 and 1 <= hi and lo <= init <= hi
    # The activator stays in the path (request-level load balancing on free slots).
    assert anns[AUTOSCALING + "target-burst-capacity"] == "-1"


def test_model_timeouts_and_cold_start_budget():
    spec = template(MODEL)["spec"]
    c = container(MODEL)
    cfg = app_config(c)
    assert spec["timeoutSeconds"] <= MAX_REVISION_TIMEOUT_SECONDS
    # The app's own deadline fires first, so clients get its error, not a cut connection.
    assert cfg.request_timeout_s < spec["timeoutSeconds"]
    # The startup probe gives the container its worst cold start; the progress deadline covers that plus the image
    # pull and a new GPU node, each at its worst-case budget (a revision not ready by then is scaled back to zero).
    window = startup_window_s(c)
    assert window >= CONTAINER_COLD_START_S
    progress = go_duration(annotations(MODEL)["serving.knative.dev/progress-deadline"])
    assert progress >= window + IMAGE_PULL_S + NODE_PROVISION_S
    # Liveness does not kill a busy pod quickly: a restart costs a whole cold start.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30
    # A pod's last requests may run as long as timeoutSeconds; retention and delays stay within Knative's bounds.
    assert go_duration(annotations(MODEL)[AUTOSCALING + "scale-to-zero-pod-retention-period"]) <= 3600


def test_cache_front_autoscaling_is_its_own():
    cc = template(FRONT)["spec"]["containerConcurrency"]
    assert _ann_num(FRONT, "min-scale") == 0
    assert 0 < _ann_num(FRONT, "target") * _ann_num(FRONT, "target-utilization-percentage") / 100 <= cc
    assert annotations(FRONT) != annotations(MODEL)
    front_cfg = app_config(container(FRONT))
    assert app_config(container(MODEL)).request_timeout_s < front_cfg.request_timeout_s \
        < template(FRONT)["spec"]["timeoutSeconds"] <= MAX_REVISION_TIMEOUT_SECONDS
    assert go_duration(annotations(FRONT)["serving.knative.dev/progress-deadline"]) > startup_window_s(container(FRONT))


# =================================================================================================================
# GPU, volumes, security
# =================================================================================================================

GPU = "nvidia.com/gpu"


def test_model_gets_one_gpu_on_a_gpu_node():
    spec = template(MODEL)["spec"]
    res = container(MODEL)["resources"]
    assert res["limits"][GPU] == "1" and GPU not in res.get("requests", {})
    assert res["requests"]["memory"] == res["limits"]["memory"], "GPU pods: memory request == limit"
    assert "cpu" in res["requests"] and "cpu" not in res["limits"], "no CPU limit (throttling stalls kernel launch)"
    assert list(spec["nodeSelector"]) == ["nvidia.com/gpu.product"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = mounts_of(spec, container(MODEL))["/dev/shm"]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_cpu_services_do_not_ask_for_gpus():
    for ksvc in KSVCS:
        if ksvc is MODEL:
            continue
        spec = template(ksvc)["spec"]
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert GPU not in container(ksvc).get("resources", {}).get("limits", {})


def _dockerfile_user() -> tuple[int, int]:
    (user,) = [args for ins, args in dockerfile() if ins == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    return uid, gid


@pytest.mark.parametrize("name", [k["metadata"]["name"] for k in KSVCS])
def test_containers_run_restricted(name):
    sc = container(one("Service", name, "serving.knative.dev/"))["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    if container(one("Service", name, "serving.knative.dev/"))["image"] == container(MODEL)["image"]:
        assert (sc["runAsUser"], sc["runAsGroup"]) == _dockerfile_user()


def test_read_only_root_has_writable_home_and_tmp():
    for ksvc in (MODEL, FRONT):
        spec, c = template(ksvc)["spec"], container(ksvc)
        writable = [p for p, v in mounts_of(spec, c).items() if "emptyDir" in v or "persistentVolumeClaim" in v]
        env = env_of(c)
        assert "/tmp" in writable and under(env["HOME"], writable)


def test_model_caches_live_on_the_volume():
    spec, c = template(MODEL)["spec"], container(MODEL)
    env, cfg = env_of(c), app_config(c)
    roots = pvc_mount_paths(spec, c)
    assert roots, "the model cache PVC is mounted"
    for path in (cfg.model_cache_dir, cfg.model_path, env["HF_HOME"], env["TORCHINDUCTOR_CACHE_DIR"],
                 env["TRITON_CACHE_DIR"]):
        assert under(path, roots), path
    for key in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert under(env[key], [cfg.model_cache_dir]), key
    assert env["HF_HUB_OFFLINE"] == "1"
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    pvc = one("PersistentVolumeClaim", claim)
    # Up to max-scale pods on several nodes mount it at once.
    assert int(_ann_num(MODEL, "max-scale")) == 1 or "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert pvc["spec"]["resources"]["requests"]["storage"].endswith("Gi")
    assert int(pvc["spec"]["resources"]["requests"]["storage"][:-2]) >= 50


# =================================================================================================================
# Consistency with the app
# =================================================================================================================

def _app_containers() -> Iterator[tuple[str, dict]]:
    image = container(MODEL)["image"]
    for ksvc in KSVCS:
        if container(ksvc)["image"] == image:
            yield ksvc["metadata"]["name"], container(ksvc)
    pod = JOB["spec"]["template"]["spec"]
    for c in pod.get("initContainers", []) + pod["containers"]:
        yield f"job/{c['name']}", c


def test_env_names_are_settings_the_app_reads():
    allowed = set(ENV_VARS) | STANDARD_ENV
    seen = 0
    for where, c in _app_containers():
        for e in c.get("env", []):
            seen += 1
            assert e["name"] in allowed, f"{where}: {e['name']} is not in function.config.ENV_VARS"
            assert e["name"] not in ("K_SERVICE", "K_REVISION", "K_CONFIGURATION", "PORT"), "set by Knative"
    assert seen > 20


@pytest.mark.parametrize("name", ["autoglm-phone-9b", "autoglm-phone-9b-cache"])
def test_env_values_are_accepted_by_config(name):
    cfg = app_config(container(one("Service", name, "serving.knative.dev/")))
    assert cfg.served_model_name == env_of(container(MODEL))["SERVED_MODEL_NAME"]


def test_model_config_matches_the_engine_plan():
    cfg = app_config(container(MODEL))
    # bf16: on the H100 80GB of the node selector it fits with a large KV cache and measured faster than fp8
    # (bench/RESULTS.md, calls 7-8); test_shipped_quantization_is_what_auto_picks_for_the_card says why it is none
    assert cfg.role == "model" and cfg.require_gpu and cfg.quantization == "none" and cfg.device == "cuda"
    assert cfg.max_num_seqs == Config().max_num_seqs, "service.yaml pins the default engine batch"


# Compute capability and total memory (as torch reports them) of the GPU products the manifests' node selectors name.
GPU_PRODUCT_CARDS = {
    "NVIDIA-H100-80GB-HBM3": ((9, 0), 79_646 * 2**20),
    "NVIDIA-L4": ((8, 9), 23_034 * 2**20),
    "NVIDIA-A10G": ((8, 6), 23_028 * 2**20),
    "NVIDIA-GeForce-RTX-4090": ((8, 9), 24_564 * 2**20),
    "NVIDIA-RTX-A5000": ((8, 6), 24_564 * 2**20),
}
VARIANTS = ROOT / "k8s" / "variants"


def auto_choice(ksvc_or_pod: dict, c: dict) -> tuple[str, str]:
    """What QUANTIZATION=auto picks (function/engine/fp8.decide_for, full-size GLM-4.1V-9B shapes) for the pod's
    settings on its GPU limit's count of the card its node selector names."""
    from transformers import Glm4vConfig

    from function.engine.fp8 import Card, decide_for
    spec = ksvc_or_pod["spec"]["template"]["spec"]
    product = spec["nodeSelector"]["nvidia.com/gpu.product"]
    assert product in GPU_PRODUCT_CARDS, f"add {product} to GPU_PRODUCT_CARDS"
    cap, total = GPU_PRODUCT_CARDS[product]
    cards = [Card(cap, total, product)] * int(c["resources"]["limits"][GPU])
    return decide_for(cards, Glm4vConfig(), app_config(c))


@pytest.mark.parametrize("where", ["service.yaml", "func.yaml", "k8s/prequantize-job.yaml",
                                   "k8s/variants/service-spot.yaml", "k8s/variants/service-2gpu.yaml"])
def test_shipped_quantization_is_what_auto_picks_for_the_card(where):
    """Every manifest ships QUANTIZATION written out (so that the Job and the service agree on the copy), and the
    value is what the auto rule picks for its node selector's card: bf16 on the H100 80GB (and on 2 x L4)."""
    if where == "func.yaml":   # its env on service.yaml's pod (test_func_yaml_matches_service_yaml: the rest)
        ksvc, c = MODEL, {**container(MODEL), "env": FUNC["run"]["envs"]}
    elif where == "k8s/prequantize-job.yaml":
        ksvc, c = JOB, JOB["spec"]["template"]["spec"]["containers"][0]
    else:
        ksvc = load_docs(ROOT / where)[0]
        c = container(ksvc)
    shipped = app_config(c).quantization
    quant, reason = auto_choice(ksvc, c)
    assert shipped == quant, f"{where} ships QUANTIZATION={shipped}, auto picks {quant}: {reason}"
    assert shipped == "none" and "bf16 fits" in reason


def test_auto_choice_follows_the_card():
    """The check above is not vacuous: the same pod on one 24 GB card gets fp8 (L4) or nf4 (A10G)."""
    for product, want in (("NVIDIA-L4", "fp8"), ("NVIDIA-GeForce-RTX-4090", "fp8"), ("NVIDIA-A10G", "nf4")):
        ksvc = json.loads(json.dumps(MODEL))
        template(ksvc)["spec"]["nodeSelector"]["nvidia.com/gpu.product"] = product
        assert auto_choice(ksvc, container(ksvc))[0] == want, product


def _listen_ports(listen: str) -> set[int]:
    return {int(a.rsplit(":", 1)[1]) for a in listen.split(",")}


def test_port_is_func_pythons():
    ports = _listen_ports(func_python.sock.DEFAULT_LISTEN_ADDRESS)
    assert ports == {8080}
    for ksvc in KSVCS:
        if container(ksvc)["image"] == container(MODEL)["image"]:
            assert {p["containerPort"] for p in container(ksvc)["ports"]} == ports
            assert container(ksvc)["ports"][0]["name"] == "http1"
    assert _listen_ports(dockerfile_env()["LISTEN_ADDRESS"]) == ports


class _Probed:
    """A func-python function instance whose readiness is switchable; its handle() must not see probe paths."""

    def __init__(self, ready: bool):
        self._ready = ready

    def alive(self):
        return True, "alive"

    def ready(self):
        return self._ready, "loading" if not self._ready else "ready"

    async def handle(self, scope, receive, send):
        raise AssertionError(f"func-python passed {scope['path']} to the function")


def _probe_status(path: str, ready: bool) -> int:
    app = func_python.http.ASGIApplication(_Probed(ready))
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def go():
        await app({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send)

    asyncio.run(go())
    return sent[0]["status"]


def _probe_paths() -> dict[str, set[str]]:
    paths: dict[str, set[str]] = {"liveness": set(), "readiness": set()}
    for ksvc in KSVCS:
        if container(ksvc)["image"] != container(MODEL)["image"]:
            continue
        c = container(ksvc)
        paths["liveness"].add(c["livenessProbe"]["httpGet"]["path"])
        paths["readiness"] |= {c["readinessProbe"]["httpGet"]["path"], c["startupProbe"]["httpGet"]["path"]}
    paths["liveness"].add(FUNC["deploy"]["healthEndpoints"]["liveness"])
    paths["readiness"].add(FUNC["deploy"]["healthEndpoints"]["readiness"])
    return paths


def test_probe_paths_are_answered_by_func_python():
    paths = _probe_paths()
    assert len(paths["liveness"]) == 1 and len(paths["readiness"]) == 1
    (live,), (ready,) = paths["liveness"], paths["readiness"]
    assert _probe_status(ready, ready=False) == 500      # not ready until the model is loaded and warm
    assert _probe_status(ready, ready=True) == 200
    assert _probe_status(live, ready=False) == 200       # alive while loading: no restart loop during a cold start


def test_the_app_serves_the_api_the_scripts_call():
    from function.api.app import build_app
    routes = {getattr(r, "path", None) for r in build_app(Config.from_env({}), object()).routes}
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= routes


# =================================================================================================================
# The pre-quantize Job
# =================================================================================================================

def test_prequantize_job_fills_what_the_service_reads():
    pod = JOB["spec"]["template"]["spec"]
    (download,) = pod["initContainers"]
    (quant,) = pod["containers"]
    model_env = env_of(container(MODEL))
    cfg = app_config(container(MODEL))
    assert download["command"] == ["hf", "download", "zai-org/AutoGLM-Phone-9B", "--local-dir", cfg.model_path]
    assert env_of(download)["HF_HUB_OFFLINE"] == "0"
    cmd = quant["command"]
    assert cmd[:2] == ["python", "scripts/prequantize.py"] and quant["workingDir"] == "/app"
    assert cmd[cmd.index("--model-path") + 1] == cfg.model_path
    assert cmd[cmd.index("--quantization") + 1] == cfg.quantization
    # The settings that decide which pre-quantized checkpoint is written/read are the same as the service's.
    job_env = env_of(quant)
    for key in ("MODEL_PATH", "MODEL_CACHE_DIR", "QUANTIZATION", "QUANTIZE_VISION", "DTYPE", "HF_HOME",
                "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert job_env.get(key) == model_env.get(key), key
    Config.from_env(job_env)
    # Same volume at the same path, same image, same GPU placement.
    spec = template(MODEL)["spec"]
    for c in (download, quant):
        assert {p: v.get("persistentVolumeClaim") for p, v in mounts_of(pod, c).items() if "persistentVolumeClaim" in v} \
            == {p: v["persistentVolumeClaim"] for p, v in mounts_of(spec, container(MODEL)).items()
                if "persistentVolumeClaim" in v}
        assert c["image"] == container(MODEL)["image"]
    assert pod["nodeSelector"] == spec["nodeSelector"] and pod["tolerations"] == spec["tolerations"]
    assert quant["resources"]["limits"][GPU] == "1"
    assert pod["restartPolicy"] == "Never"
    uid, gid = _dockerfile_user()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (uid, gid)
    # The image carries the script the Job runs.
    assert any(ins == "COPY" and args.split()[0] == cmd[1] for ins, args in dockerfile())


def test_prequantize_script_takes_the_jobs_arguments():
    script = ROOT / "scripts" / "prequantize.py"
    if not script.exists():
        pytest.skip("scripts/prequantize.py is not written yet")
    text = script.read_text()
    assert "--model-path" in text and "--quantization" in text


# =================================================================================================================
# Knative Eventing
# =================================================================================================================

_REF = {"type": "object", "required": ["apiVersion", "kind", "name"], "additionalProperties": False,
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                       "namespace": {"type": "string"}}}
_DESTINATION = {"type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {"ref": _REF, "uri": {"type": "string"}, "CACerts": {"type": "string"},
                               "audience": {"type": "string"}}}
_DELIVERY = {"type": "object", "additionalProperties": False, "properties": {
    "deadLetterSink": _DESTINATION, "retry": {"type": "integer", "minimum": 0},
    "backoffPolicy": {"enum": ["linear", "exponential"]}, "backoffDelay": {"type": "string"},
    "timeout": {"type": "string"}, "retryAfterMax": {"type": "string"}, "format": {"enum": ["json", "binary"]}}}
_META = {"type": "object", "required": ["name"]}
BROKER_SCHEMA = {"type": "object", "required": ["apiVersion", "kind", "metadata"], "additionalProperties": False,
                 "properties": {"apiVersion": {"const": "eventing.knative.dev/v1"}, "kind": {"const": "Broker"},
                                "metadata": _META, "spec": {"type": "object", "additionalProperties": False,
                                                            "properties": {"config": _REF, "delivery": _DELIVERY}}}}
TRIGGER_SCHEMA = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                  "additionalProperties": False,
                  "properties": {"apiVersion": {"const": "eventing.knative.dev/v1"}, "kind": {"const": "Trigger"},
                                 "metadata": _META, "spec": {
                                     "type": "object", "required": ["broker", "subscriber"],
                                     "additionalProperties": False, "properties": {
                                         "broker": {"type": "string"},
                                         "filter": {"type": "object", "additionalProperties": False, "properties": {
                                             "attributes": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                                         "filters": {"type": "array"},
                                         "subscriber": _DESTINATION, "delivery": _DELIVERY}}}}


def required_eventing_flags() -> set[str]:
    flags = set()
    for d in find("Trigger") + find("Broker", api="eventing.knative.dev/"):
        delivery = d.get("spec", {}).get("delivery", {})
        if "timeout" in delivery:
            flags.add("delivery-timeout")
        if "retryAfterMax" in delivery:
            flags.add("delivery-retryafter")
    return flags


def _resolves(ref: dict) -> bool:
    return bool(find(ref["kind"], ref["name"], ref["apiVersion"]))


def test_broker_and_trigger_shapes():
    brokers, triggers = find("Broker", api="eventing.knative.dev/"), find("Trigger")
    assert len(brokers) == 1 and len(triggers) == 1
    jsonschema.validate(brokers[0], BROKER_SCHEMA)
    jsonschema.validate(triggers[0], TRIGGER_SCHEMA)
    assert brokers[0]["metadata"]["annotations"]["eventing.knative.dev/broker.class"]


def test_trigger_routes_request_events_to_the_model():
    (broker,), (trigger,) = find("Broker", api="eventing.knative.dev/"), find("Trigger")
    cfg = app_config(container(MODEL))
    spec = trigger["spec"]
    assert spec["broker"] == broker["metadata"]["name"]
    assert spec["filter"]["attributes"] == {"type": cfg.ce_request_type}
    # Replies go back into the broker: they must not match this trigger, or they would loop into the model.
    assert cfg.ce_response_type != cfg.ce_request_type
    assert spec["subscriber"]["ref"] == {"apiVersion": MODEL["apiVersion"], "kind": "Service",
                                         "name": MODEL["metadata"]["name"]}


def test_trigger_delivery_is_retry_correct():
    (trigger,) = find("Trigger")
    d = trigger["spec"]["delivery"]
    cfg = app_config(container(MODEL))
    assert d["retry"] >= 1 and d["backoffPolicy"] == "exponential"
    assert iso8601_duration(d["backoffDelay"]) > 0
    # Each attempt waits at least as long as the app's own deadline, and no longer than Knative lets it run: a
    # shorter timeout would re-send an event whose generation is still running.
    timeout = iso8601_duration(d["timeout"])
    assert cfg.request_timeout_s <= timeout <= template(MODEL)["spec"]["timeoutSeconds"]
    # Retrying spans about a cold start (an overloaded or restarting service is ridden out).
    delay = iso8601_duration(d["backoffDelay"])
    assert sum(delay * 2**i for i in range(d["retry"])) >= 120
    assert _resolves(d["deadLetterSink"]["ref"])
    assert "retryAfterMax" not in d, "needs the alpha delivery-retryafter flag"


# =================================================================================================================
# Cache front + Redis
# =================================================================================================================

def test_cache_front_points_at_the_model_and_redis():
    cfg = app_config(container(FRONT))
    assert cfg.role == "cache-front"
    model_url = urllib.parse.urlsplit(cfg.model_url)
    assert model_url.scheme == "http" and model_url.hostname == f"{MODEL['metadata']['name']}.default.svc.cluster.local"
    redis_url = urllib.parse.urlsplit(cfg.response_cache_url)
    assert redis_url.scheme == "redis"
    svc = one("Service", redis_url.hostname, "v1")
    (port,) = svc["spec"]["ports"]
    assert port["port"] == redis_url.port
    (dep,) = [d for d in find("Deployment")
              if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (redis,) = dep["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in redis["ports"]}
    assert "--maxmemory" in redis["args"]


def test_only_the_services_may_reach_redis():
    (policy,) = find("NetworkPolicy")
    redis = one("Deployment", "autoglm-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    allowed = {p["podSelector"]["matchLabels"]["serving.knative.dev/service"] for p in policy["spec"]["ingress"][0]["from"]}
    assert FRONT["metadata"]["name"] in allowed


# =================================================================================================================
# func.yaml
# =================================================================================================================

_QUANTITY = {"type": "string", "pattern": r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"}
_ENV = {"type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "pattern": r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"},
                       "value": {"type": "string"}}}
_VOLUME = {"type": "object", "additionalProperties": False, "required": ["path"],
           "properties": {"secret": {"type": "string"}, "configMap": {"type": "string"},
                          "persistentVolumeClaim": {"type": "object", "additionalProperties": False,
                                                    "properties": {"claimName": {"type": "string"},
                                                                   "readOnly": {"type": "boolean"}}},
                          "emptyDir": {"type": "object", "additionalProperties": False,
                                       "properties": {"medium": {"type": "string"}, "sizeLimit": {"type": "string"}}},
                          "path": {"type": "string"}},
           "oneOf": [{"required": [k]} for k in ("secret", "configMap", "persistentVolumeClaim", "emptyDir")]}
# knative/func schema/func_yaml-schema.json (specVersion 0.36.0), the parts this project uses, closed.
FUNC_YAML_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["specVersion", "name", "runtime", "created"], "additionalProperties": False,
    "properties": {
        "specVersion": {"const": "0.36.0"},
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "domain": {"type": "string"}, "runtime": {"enum": ["go", "node", "python", "quarkus", "rust", "springboot",
                                                            "typescript"]},
        "registry": {"type": "string"}, "image": {"type": "string"}, "namespace": {"type": "string"},
        "created": {"type": "string"}, "invoke": {"enum": ["http", "cloudevent"]},
        "build": {"type": "object", "additionalProperties": False, "properties": {
            "git": {"type": "object"}, "builderImages": {"type": "object"}, "buildpacks": {"type": "array"},
            "builder": {"enum": ["pack", "s2i", "host"]}, "buildEnvs": {"type": "array", "items": _ENV},
            "pvcSize": {"type": "string"}, "remoteStorageClass": {"type": "string"}, "volumes": {"type": "array"}}},
        "run": {"type": "object", "additionalProperties": False, "properties": {
            "volumes": {"type": "array", "items": _VOLUME}, "envs": {"type": "array", "items": _ENV},
            "startTimeout": {"type": "integer"}}},
        "deploy": {"type": "object", "additionalProperties": False, "properties": {
            "namespace": {"type": "string"}, "remote": {"type": "boolean"}, "image": {"type": "string"},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            "options": {"type": "object", "additionalProperties": False, "properties": {
                "scale": {"type": "object", "additionalProperties": False, "properties": {
                    "min": {"type": "integer", "minimum": 0}, "max": {"type": "integer", "minimum": 0},
                    "metric": {"enum": ["concurrency", "rps"]}, "target": {"type": "number", "minimum": 0},
                    "utilization": {"type": "number", "minimum": 1, "maximum": 100}}},
                "resources": {"type": "object", "additionalProperties": False, "properties": {
                    "requests": {"type": "object", "additionalProperties": False,
                                 "properties": {"cpu": _QUANTITY, "memory": _QUANTITY}},
                    "limits": {"type": "object", "additionalProperties": False,
                               "properties": {"cpu": _QUANTITY, "memory": _QUANTITY,
                                              "concurrency": {"type": "integer", "minimum": 0}}}}}}},
            "labels": {"type": "array"},
            "healthEndpoints": {"type": "object", "additionalProperties": False,
                                "properties": {"liveness": {"type": "string"}, "readiness": {"type": "string"}}},
            "serviceAccountName": {"type": "string"},
            "subscriptions": {"type": "array"}}},
    },
}


def test_func_yaml_validates():
    jsonschema.validate(FUNC, FUNC_YAML_SCHEMA)
    dt.datetime.fromisoformat(FUNC["created"].replace("Z", "+00:00"))
    assert FUNC["runtime"] == "python" and FUNC["invoke"] == "http"


def test_func_yaml_schema_rejects_unknown_fields():
    bad = json.loads(json.dumps(FUNC))
    bad["deploy"]["options"]["resources"]["limits"]["nvidia.com/gpu"] = "1"   # func.yaml cannot express a GPU
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, FUNC_YAML_SCHEMA)


def test_func_yaml_matches_service_yaml():
    spec, c = template(MODEL)["spec"], container(MODEL)
    assert FUNC["name"] == MODEL["metadata"]["name"]
    # No image: a plain `func deploy` would otherwise build with pack/s2i and push over the Dockerfile's image.
    assert "image" not in FUNC and "image" not in FUNC.get("deploy", {})
    assert {e["name"]: e["value"] for e in FUNC["run"]["envs"]} == env_of(c)
    func_mounts = {v["path"]: {k: val for k, val in v.items() if k != "path"} for v in FUNC["run"]["volumes"]}
    ksvc_mounts = {p: {k: val for k, val in v.items() if k != "name"} for p, v in mounts_of(spec, c).items()}
    assert func_mounts == ksvc_mounts
    scale = FUNC["deploy"]["options"]["scale"]
    assert (scale["min"], scale["max"], scale["metric"], scale["target"], scale["utilization"]) == (
        int(_ann_num(MODEL, "min-scale")), int(_ann_num(MODEL, "max-scale")), annotations(MODEL)[AUTOSCALING + "metric"],
        _ann_num(MODEL, "target"), _ann_num(MODEL, "target-utilization-percentage"))
    res = FUNC["deploy"]["options"]["resources"]
    assert res["limits"]["concurrency"] == spec["containerConcurrency"]
    assert res["requests"] == c["resources"]["requests"]
    assert {k: v for k, v in res["limits"].items() if k != "concurrency"} == \
        {k: v for k, v in c["resources"]["limits"].items() if k != GPU}
    assert FUNC["deploy"]["healthEndpoints"] == {"liveness": c["livenessProbe"]["httpGet"]["path"],
                                                  "readiness": c["readinessProbe"]["httpGet"]["path"]}


def test_func_yaml_leaves_autoscaling_and_triggers_to_the_right_places():
    # func copies deploy.annotations onto the Service's own metadata too, where Knative rejects autoscaling keys.
    assert not [k for k in FUNC["deploy"].get("annotations", {}) if k.startswith(AUTOSCALING)]
    # The Trigger in k8s/eventing.yaml has the delivery options; a func subscription would be a second Trigger.
    assert not FUNC["deploy"].get("subscriptions")


# =================================================================================================================
# Dockerfile
# =================================================================================================================

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        ins, _, args = buf.strip().partition(" ")
        out.append((ins.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for ins, args in dockerfile():
        if ins == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def dockerfile_args() -> dict[str, str]:
    return dict(shlex.split(a)[0].partition("=")[::2] for i, a in dockerfile() if i == "ARG")


def test_dockerfile_base_is_cudas_base_flavour():
    """torch's wheels bring the CUDA libraries (nvidia-* wheels); the "runtime"/"devel" flavours would add a second,
    unused copy (docs/image.md)."""
    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    image = dockerfile_args()[base.strip("${}")] if base.startswith("$") else base
    assert image.startswith("nvidia/cuda:") and image.split(":")[1].split("-")[1] == "base"
    assert image.endswith("-ubuntu24.04"), "Python 3.12 from the distribution"


def test_dockerfile_env_and_user():
    env = dockerfile_env()
    assert set(env) <= set(ENV_VARS) | STANDARD_ENV | BUILD_ENV, set(env) - set(ENV_VARS) - STANDARD_ENV - BUILD_ENV
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    # a fixed mmap threshold, so freed image-sized buffers leave the process instead of piling up in glibc's arenas
    assert 128 * 1024 <= int(env["MALLOC_MMAP_THRESHOLD_"]) <= 4 * 1024 * 1024
    assert env["MODEL_CACHE_DIR"] == app_config(container(MODEL)).model_cache_dir
    for key in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert under(env[key], [env["MODEL_CACHE_DIR"]]) and env[key] == env_of(container(MODEL))[key], key
    uid, gid = _dockerfile_user()
    assert uid > 0 and gid > 0


def test_benches_run_the_server_with_the_images_env():
    """The bench's server process gets what the image's ENV sets for the allocator, or its RSS numbers would
    measure a process the image never runs."""
    tree = ast.parse((ROOT / "bench" / "engine_bench.py").read_text())
    (image_env,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "IMAGE_ENV" for t in n.targets)]
    env = dockerfile_env()
    assert image_env and all(env.get(k) == v for k, v in image_env.items()), (image_env, env)
    assert {k for k in env if k.startswith("MALLOC_")} <= set(image_env)


def test_dockerfile_installs_in_cache_friendly_order():
    steps = [f"{i} {a}" for i, a in dockerfile()]

    def at(pattern: str) -> int:
        hits = [n for n, s in enumerate(steps) if re.search(pattern, s)]
        assert hits, pattern
        return hits[0]

    torch = at(r"^RUN pip install .*TORCH_SPEC")
    deps_copy = at(r"^COPY pyproject\.toml")
    deps = at(r"pip install -r")
    code = at(r"^COPY function ")
    project = at(r"pip install --no-deps \.")
    assert torch < deps_copy < deps < code < project
    assert dockerfile_args()["TORCH_SPEC"] == "torch>=2.4"
    assert "optional-dependencies']['gpu']" in steps[deps], "bitsandbytes comes with the gpu extra"
    flash = at(r"FLASH_ATTN_WHEEL")
    flash_step = next(s for s in steps[flash:] if s.startswith("RUN") and "flash" in s)
    assert "||" in flash_step, "a failing flash-attn wheel must not fail the build (sdpa is the fallback)"


def test_dockerfile_entrypoint_serves_through_func_python():
    (entry,) = [a for i, a in dockerfile() if i == "ENTRYPOINT"]
    argv = json.loads(entry)
    assert argv[:2] == ["python", "-c"]
    tree = ast.parse(argv[2])
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imports == {("func_python.http", "serve"), ("function", "new")}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [(c.func.id, [a.id for a in c.args]) for c in calls] == [("serve", ["new"])]
    import function
    assert function.new.__name__ == "new", "func-python's serve() dispatches on the name 'new'"
    assert callable(func_python.http.serve)


def test_dockerignore_keeps_the_build_context_small_but_complete():
    ignored = {l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert {".git", ".venv", "tests", "bench"} <= ignored
    copied = {a.split()[0] for i, a in dockerfile() if i == "COPY"} | {"README.md"}
    for path in copied:
        assert path not in ignored and not any(path.endswith(p.lstrip("*")) for p in ignored if p.startswith("*.")), path


# =================================================================================================================
# docs/deploy.md: the long kn command is the same Service
# =================================================================================================================

def _kn_long_command() -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "--node-selector" in b)
    return shlex.split(block.replace("\\\n", " "))


def test_documented_kn_command_matches_service_yaml():
    argv = _kn_long_command()
    assert argv[:4] == ["kn", "service", "create", MODEL["metadata"]["name"]]

    def values(flag: str) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    (c, spec, anns) = (container(MODEL), template(MODEL)["spec"], annotations(MODEL))
    assert dict(v.split("=", 1) for v in values("--env")) == env_of(c)
    assert values("--image") == [c["image"]]
    assert values("--concurrency-limit") == [str(spec["containerConcurrency"])]
    assert values("--timeout") == [str(spec["timeoutSeconds"])]
    for flag, key in (("--scale-min", "min-scale"), ("--scale-max", "max-scale"), ("--scale-init", "initial-scale"),
                      ("--scale-target", "target"), ("--scale-utilization", "target-utilization-percentage"),
                      ("--scale-window", "window"), ("--scale-metric", "metric")):
        assert values(flag) == [anns[AUTOSCALING + key]], flag
    documented = dict(v.split("=", 1) for v in values("--annotation-revision"))
    for key, value in documented.items():
        assert anns[key] == value, key
    covered = set(documented) | {AUTOSCALING + k for k in ("min-scale", "max-scale", "initial-scale", "target",
                                                           "target-utilization-percentage", "window", "metric",
                                                           "class")}
    assert covered >= set(anns), set(anns) - covered
    limits = dict(kv.split("=", 1) for v in values("--limit") for kv in v.split(","))
    requests = dict(kv.split("=", 1) for v in values("--request") for kv in v.split(","))
    assert limits == c["resources"]["limits"] and requests == c["resources"]["requests"]
    assert values("--node-selector") == ["=".join(*spec["nodeSelector"].items())]
    assert values("--user") == [str(c["securityContext"]["runAsUser"])]
    mounts = dict(v.split("=", 1) for v in values("--mount"))
    assert set(mounts) == {m["mountPath"] for m in c["volumeMounts"]}
    assert f"pvc:{spec['volumes'][0]['persistentVolumeClaim']['claimName']}" == mounts["/models"]


# =================================================================================================================
# Where pods land: a small model of the scheduler's node filters (nodeSelector, required node affinity, taints)
# =================================================================================================================

H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
GPU_TAINT = {"key": GPU, "value": "present", "effect": "NoSchedule"}
# Nodes as the providers label and taint them (GPU feature discovery sets nvidia.com/gpu.product everywhere).
NODES: dict[str, dict] = {
    "on-demand H100": {"labels": {**H100}, "taints": [GPU_TAINT]},
    "GKE spot H100": {"labels": {**H100, "cloud.google.com/gke-spot": "true"},
                      "taints": [GPU_TAINT, {"key": "cloud.google.com/gke-spot", "value": "true",
                                             "effect": "NoSchedule"}]},
    "GKE preemptible H100": {"labels": {**H100, "cloud.google.com/gke-preemptible": "true"}, "taints": [GPU_TAINT]},
    "EKS spot H100": {"labels": {**H100, "eks.amazonaws.com/capacityType": "SPOT"}, "taints": [GPU_TAINT]},
    "EKS on-demand H100": {"labels": {**H100, "eks.amazonaws.com/capacityType": "ON_DEMAND"}, "taints": [GPU_TAINT]},
    "Karpenter spot H100": {"labels": {**H100, "karpenter.sh/capacity-type": "spot"}, "taints": []},
    "AKS spot H100": {"labels": {**H100, "kubernetes.azure.com/scalesetpriority": "spot"},
                      "taints": [GPU_TAINT, {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot",
                                             "effect": "NoSchedule"}]},
    "on-demand L4": {"labels": {"nvidia.com/gpu.product": "NVIDIA-L4"}, "taints": [GPU_TAINT]},
    "H100 reserved for another team": {"labels": {**H100}, "taints": [GPU_TAINT, {"key": "team", "value": "ml",
                                                                                  "effect": "NoSchedule"}]},
    "CPU node": {"labels": {}, "taints": []},
}


def _expression_holds(e: dict, labels: dict[str, str]) -> bool:
    op, key = e["operator"], e["key"]
    if op == "In":
        return labels.get(key) in e["values"]
    if op == "NotIn":
        return key not in labels or labels[key] not in e["values"]
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"operator {op} not modelled")


def _tolerates(tol: dict, taint: dict) -> bool:
    if tol.get("effect") and tol["effect"] != taint["effect"]:
        return False
    if tol.get("operator", "Equal") == "Exists":
        return not tol.get("key") or tol["key"] == taint["key"]
    return tol.get("key") == taint["key"] and tol.get("value", "") == taint.get("value", "")


def schedulable(pod_spec: dict, node: dict) -> bool:
    """Whether the scheduler's filters (NodeSelector, NodeAffinity required terms, TaintToleration for NoSchedule /
    NoExecute) let a pod with this spec onto the node."""
    labels = node["labels"]
    if not pod_spec.get("nodeSelector", {}).items() <= labels.items():
        return False
    req = pod_spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if req is not None and not any(all(_expression_holds(e, labels) for e in term.get("matchExpressions", []))
                                   for term in req["nodeSelectorTerms"]):
        return False
    return all(any(_tolerates(t, taint) for t in pod_spec.get("tolerations", []))
               for taint in node["taints"] if taint["effect"] in ("NoSchedule", "NoExecute"))


def landing_nodes(pod_spec: dict) -> set[str]:
    return {name for name, node in NODES.items() if schedulable(pod_spec, node)}


def test_scheduling_model():
    spec = template(MODEL)["spec"]
    assert landing_nodes(spec) == {"on-demand H100", "GKE preemptible H100", "EKS spot H100", "EKS on-demand H100",
                                   "Karpenter spot H100"}
    assert landing_nodes({}) == {"Karpenter spot H100", "CPU node"}
    assert _tolerates({"operator": "Exists"}, GPU_TAINT) and not _tolerates({"key": "x", "operator": "Exists"},
                                                                            GPU_TAINT)


# =================================================================================================================
# Image pre-pull DaemonSet
# =================================================================================================================

def _pod_placement(spec: dict) -> dict:
    return {k: spec.get(k) for k in ("nodeSelector", "tolerations", "affinity")}


def test_prepull_lands_where_the_service_can():
    pod = PREPULL["spec"]["template"]["spec"]
    assert _pod_placement(pod) == _pod_placement(template(MODEL)["spec"])
    assert landing_nodes(pod) == landing_nodes(template(MODEL)["spec"])
    assert PREPULL["spec"]["selector"]["matchLabels"].items() <= PREPULL["spec"]["template"]["metadata"][
        "labels"].items()


def test_prepull_pulls_the_service_image_with_a_no_op_and_holds_no_gpu():
    pod = PREPULL["spec"]["template"]["spec"]
    (pull,) = pod["initContainers"]
    (pause,) = pod["containers"]
    assert pull["image"] == container(MODEL)["image"] and pull["imagePullPolicy"] == "IfNotPresent"
    assert pull["command"] == ["true"] and "args" not in pull, "the image's no-op, not its server"
    assert env_of(pull) == {"NVIDIA_VISIBLE_DEVICES": "void"}, "no GPU handed to the no-op"
    assert pause["image"].startswith("registry.k8s.io/pause:") and "command" not in pause
    for c in (pull, pause):
        res = c["resources"]
        assert GPU not in res.get("limits", {}) and GPU not in res.get("requests", {})
        cpu = res["requests"]["cpu"]
        assert cpu.endswith("m") and int(cpu[:-1]) <= 10
        for q in (res["requests"]["memory"], res["limits"]["memory"]):
            assert q.endswith("Mi") and int(q[:-2]) <= 64
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
    uid, gid = _dockerfile_user()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["automountServiceAccountToken"] is False
    assert PREPULL["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "100%"


# =================================================================================================================
# Scheduled scaling: CronJobs, their patch, their RBAC
# =================================================================================================================

CRONJOBS = find("CronJob", api="batch/")
SCALER_SA = one("ServiceAccount", "autoglm-scaler")


def _job_request(cj: dict) -> tuple[str, str, str, str, dict]:
    """(verb, API group, resource, name, merge patch) of the one kubectl call the CronJob's container makes."""
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "command" not in c and c["image"].startswith("registry.k8s.io/kubectl:"), "the image's kubectl entrypoint"
    argv = [a for a in c["args"] if not a.startswith("--cache-dir=")]
    assert argv[0] == "patch" and "--type=merge" in argv
    resource, _, group = argv[1].partition(".")
    rest = [a for a in argv[3:] if a != "--type=merge"]
    assert rest[0] == "-p" and len(rest) == 2, f"nothing but the patch: {argv}"
    return "patch", group, resource, argv[2], json.loads(rest[1])


def merge_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(doc) if isinstance(doc, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def rbac_allows(rules: list[dict], verb: str, group: str, resource: str, name: str) -> bool:
    """The RBAC authorizer's rule matching (pkg/registry/rbac/validation/rule.go) for one namespaced request."""
    def has(values: list[str], v: str) -> bool:
        return "*" in values or v in values
    return any(has(r.get("verbs", []), verb) and has(r.get("apiGroups", []), group)
               and has(r.get("resources", []), resource)
               and (not r.get("resourceNames") or name in r["resourceNames"]) for r in rules)


def test_schedule_cronjobs_patch_min_scale_only():
    assert len(CRONJOBS) == 2
    values = []
    for cj in CRONJOBS:
        verb, group, resource, name, patch = _job_request(cj)
        assert (group, resource, name) == ("serving.knative.dev", "services", MODEL["metadata"]["name"])
        patched = merge_patch(MODEL, patch)
        anns = annotations(patched)
        # the result is service.yaml but for min-scale, and Knative would accept it
        assert {k: v for k, v in anns.items() if k != AUTOSCALING + "min-scale"} == \
            {k: v for k, v in annotations(MODEL).items() if k != AUTOSCALING + "min-scale"}
        assert json.dumps({**patched, "spec": {}}) == json.dumps({**MODEL, "spec": {}})
        assert template(patched)["spec"] == template(MODEL)["spec"]
        assert not knative_service_check(patched)[0]
        values.append(int(anns[AUTOSCALING + "min-scale"]))
    # business hours: a warm pod within max-scale; night: service.yaml's own min-scale (scale to zero)
    assert min(values) == int(_ann_num(MODEL, "min-scale")) == 0
    assert 1 <= max(values) <= int(_ann_num(MODEL, "max-scale"))


def test_schedule_times_and_zone():
    import sys
    from zoneinfo import ZoneInfo
    sys.path.insert(0, str(ROOT / "scripts"))
    import plan_autoscaling as pa
    zones = {cj["spec"]["timeZone"] for cj in CRONJOBS}
    assert len(zones) == 1, "both switches in one zone"
    ZoneInfo(zones.pop())
    crons = [pa.Cron(cj["spec"]["schedule"]) for cj in CRONJOBS]
    assert crons[0].sets != crons[1].sets
    for cj in CRONJOBS:
        assert cj["spec"]["concurrencyPolicy"] == "Forbid" and cj["spec"]["startingDeadlineSeconds"] > 0
    # the planner reads the same switches from the file
    assert len(pa.Schedule.load(str(ROOT / "k8s" / "schedule.yaml")).entries) == 2


def test_schedule_rbac_allows_exactly_the_patch():
    (role,) = find("Role", api="rbac.authorization.k8s.io/")
    (binding,) = find("RoleBinding", api="rbac.authorization.k8s.io/")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["name"] == SCALER_SA["metadata"]["name"]
    assert subject.get("namespace") is None, "the binding's own namespace: the one the file is applied to"
    needed = set()
    for cj in CRONJOBS:
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == SCALER_SA["metadata"]["name"]
        assert pod.get("automountServiceAccountToken", True), "kubectl needs the account's token"
        needed.add(_job_request(cj)[:4])
    name = MODEL["metadata"]["name"]
    verbs = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "escalate", "bind"]
    resources = [("serving.knative.dev", "services"), ("serving.knative.dev", "revisions"),
                 ("serving.knative.dev", "configurations"), ("serving.knative.dev", "routes"), ("", "services"),
                 ("", "pods"), ("", "secrets"), ("apps", "deployments"), ("batch", "cronjobs"),
                 ("autoscaling.internal.knative.dev", "podautoscalers"), ("rbac.authorization.k8s.io", "roles")]
    allowed = {(v, g, r, n) for v in verbs for g, r in resources for n in (name, f"{name}-cache", "other")
               if rbac_allows(role["rules"], v, g, r, n)}
    assert allowed == needed == {("patch", "serving.knative.dev", "services", name)}
    # the authorizer model itself
    assert rbac_allows([{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}], "get", "", "pods", "x")
    assert not rbac_allows([{"verbs": ["patch"], "apiGroups": [""], "resources": ["services"],
                             "resourceNames": ["a"]}], "patch", "", "services", "b")


def test_schedule_pods_run_restricted():
    for cj in CRONJOBS:
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        # kubectl's discovery cache goes to the writable emptyDir, not the read-only root
        cache = next(a for a in c["args"] if a.startswith("--cache-dir=")).split("=", 1)[1]
        assert under(cache, [m for m, v in mounts_of(pod, c).items() if "emptyDir" in v])


# =================================================================================================================
# docs/image.md: the size budget adds up and names the base the Dockerfile uses
# =================================================================================================================

def test_image_size_budget_adds_up():
    text = (ROOT / "docs" / "image.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| layer")]
    cells = [[c.strip().strip("*") for c in r.strip("|").split("|")] for r in rows if len(r.split("|")) == 6]
    *layers, total = cells
    assert total[0] == "total" and len(layers) == 5
    for col in (2, 3):
        assert sum(int(r[col]) for r in layers) == int(total[col]), f"column {col}"
    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    assert dockerfile_args()[base.strip("${}")] in layers[0][0]
    for ins, args in dockerfile():
        if ins == "COPY":
            assert args.split()[0] in text, f"the budget covers COPY {args}"
