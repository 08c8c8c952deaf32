"""k8s/variants/service-spot.yaml, service.yaml on a spot / preemptible GPU pool, checked without a cluster.

* The same checks as service.yaml (tests/test_manifests.py's helpers): Knative Serving's admission rules (plus the
  one feature flag node affinity needs), kubernetes-validate on the pod template, the PVC and the DaemonSet, env
  names and values the app accepts, the autoscaling and cold-start relations.
* Where it lands (the scheduling model of test_manifests.py on provider-like nodes): only spot/preemptible nodes of
  the selected GPU, on GKE, EKS, Karpenter and AKS, tainted or not; its pre-pull DaemonSet lands on the same nodes.
* The drain fits EC2 Spot's two-minute notice: queue-proxy's drain + REQUEST_TIMEOUT_S + the app's drain margin,
  while a phone step at full load (bench/capacity.json) still fits REQUEST_TIMEOUT_S.
* Everything else is service.yaml's (and k8s/prepull.yaml's), field for field.
"""
from __future__ import annotations

import json

import pytest

from function.config import ENV_VARS
from function.shutdown import DRAIN_MARGIN_S
from test_manifests import (
    AUTOSCALING, CONTAINER_COLD_START_S, IMAGE_PULL_S, K8S_VERSIONS, MAX_REVISION_TIMEOUT_SECONDS, MODEL,
    NODE_PROVISION_S, PREPULL, ROOT, SERVICE_YAML, STANDARD_ENV, annotations, app_config, container, env_of,
    go_duration, k8s_errors, knative_service_check, landing_nodes, load_docs, pod_from_ksvc, startup_window_s,
    template,
)

SPOT_YAML = ROOT / "k8s" / "variants" / "service-spot.yaml"
DOCS = load_docs(SPOT_YAML)
SPOT = DOCS[0]
SPOT_PREPULL = DOCS[2]

# Preemption notice (seconds) of the pool this variant is sized for: EC2 Spot's interruption notice.
PREEMPTION_NOTICE_S = 120
# queue-proxy's drain before the app gets SIGTERM: the user container's preStop calls queue-proxy's
# /wait-for-drain, which returns after a quiet period of 30 s without new requests.
QUEUE_PROXY_DRAIN_S = 30
SPOT_NODES = {"GKE spot H100", "GKE preemptible H100", "EKS spot H100", "Karpenter spot H100", "AKS spot H100"}
# The fields in which the variant may differ from service.yaml, and nothing else.
VARIANT_ENV = {"REQUEST_TIMEOUT_S"}


def test_variant_file_shape():
    assert [(d["apiVersion"], d["kind"]) for d in DOCS] == [("serving.knative.dev/v1", "Service"),
                                                             ("v1", "PersistentVolumeClaim"), ("apps/v1", "DaemonSet")]
    assert all("namespace" not in d["metadata"] for d in DOCS)
    assert SPOT_YAML.parent.name == "variants" and SPOT_YAML not in (ROOT / "k8s").glob("*.yaml")
    # it replaces service.yaml's Service and PVC and k8s/prepull.yaml's DaemonSet
    assert SPOT["metadata"] == MODEL["metadata"] and DOCS[1] == load_docs(SERVICE_YAML)[1]
    assert SPOT_PREPULL["metadata"] == PREPULL["metadata"]


def test_variant_passes_servings_validation_with_one_more_flag():
    errs, flags = knative_service_check(SPOT)
    assert not errs, "\n".join(errs)
    assert flags == knative_service_check(MODEL)[1] | {"kubernetes.podspec-affinity"}
    text = SPOT_YAML.read_text()
    assert "kubernetes.podspec-affinity" in text and "kubernetes.podspec-affinity" in (
        ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_variant_validates_as_kubernetes_objects(version):
    assert k8s_errors(pod_from_ksvc(SPOT), version) is None
    for d in DOCS[1:]:
        assert k8s_errors(d, version) is None


def test_variant_lands_on_spot_gpu_nodes_only():
    assert landing_nodes(template(SPOT)["spec"]) == SPOT_NODES
    assert landing_nodes(SPOT_PREPULL["spec"]["template"]["spec"]) == SPOT_NODES
    # and without the affinity it would not: the on-demand nodes are what it keeps out
    spec = json.loads(json.dumps(template(SPOT)["spec"]))
    del spec["affinity"]
    assert {"on-demand H100", "EKS on-demand H100"} <= landing_nodes(spec)


def test_env_is_accepted_and_relations_hold():
    c = container(SPOT)
    assert {e["name"] for e in c["env"]} <= set(ENV_VARS) | STANDARD_ENV
    cfg = app_config(c)
    spec = template(SPOT)["spec"]
    assert cfg.request_timeout_s < spec["timeoutSeconds"] <= MAX_REVISION_TIMEOUT_SECONDS
    assert startup_window_s(c) >= CONTAINER_COLD_START_S
    assert go_duration(annotations(SPOT)["serving.knative.dev/progress-deadline"]) >= \
        startup_window_s(c) + IMAGE_PULL_S + NODE_PROVISION_S


def test_drain_fits_the_preemption_notice_and_a_phone_step_fits_the_deadline():
    cfg = app_config(container(SPOT))
    assert QUEUE_PROXY_DRAIN_S + cfg.request_timeout_s + DRAIN_MARGIN_S <= PREEMPTION_NOTICE_S
    assert app_config(container(MODEL)).request_timeout_s + DRAIN_MARGIN_S > PREEMPTION_NOTICE_S, \
        "service.yaml's deadline would not fit: the reason for the change"
    # p99 TTFT + p99 output x p99 time per token, at the pod's full concurrency (containerConcurrency)
    cap = json.loads((ROOT / "bench" / "capacity.json").read_text())
    cc = template(SPOT)["spec"]["containerConcurrency"]
    level = min((lv for lv in cap["levels"] if lv["concurrency"] >= cc), key=lambda lv: lv["concurrency"])
    step = level["ttft_s"]["p99"] + cap["workload"]["output_tokens"]["p99"] * level["tpot_s"]["p99"]
    assert step < cfg.request_timeout_s, f"a p99 phone step ({step:.1f} s) would be cut"


def test_everything_else_is_service_yamls():
    v = json.loads(json.dumps(SPOT))
    spec = template(v)["spec"]
    extra_tolerations = [t for t in spec["tolerations"] if t not in template(MODEL)["spec"]["tolerations"]]
    assert spec["tolerations"][:len(template(MODEL)["spec"]["tolerations"])] == template(MODEL)["spec"]["tolerations"]
    assert {t["key"] for t in extra_tolerations} <= {"cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible",
                                                     "kubernetes.azure.com/scalesetpriority"}
    spec["tolerations"] = template(MODEL)["spec"]["tolerations"]
    del spec["affinity"]
    vc = container(v)
    assert {n for n, val in env_of(vc).items() if env_of(container(MODEL)).get(n) != val} == VARIANT_ENV
    assert [e["name"] for e in vc["env"]] == [e["name"] for e in container(MODEL)["env"]]
    vc["env"] = container(MODEL)["env"]
    assert v == MODEL


def test_spot_prepull_is_prepull_yaml_placed_like_the_variant():
    d = json.loads(json.dumps(SPOT_PREPULL))
    pod = d["spec"]["template"]["spec"]
    assert {k: pod.get(k) for k in ("nodeSelector", "tolerations", "affinity")} == \
        {k: template(SPOT)["spec"].get(k) for k in ("nodeSelector", "tolerations", "affinity")}
    base = PREPULL["spec"]["template"]["spec"]
    for k in ("nodeSelector", "tolerations", "affinity"):
        if k in base:
            pod[k] = base[k]
        else:
            pod.pop(k, None)
    assert d == PREPULL


def test_docs_describe_the_variant():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "k8s/variants/service-spot.yaml" in doc and "preemption" in doc.lower()
    assert AUTOSCALING + "min-scale" in (ROOT / "k8s" / "schedule.yaml").read_text()
