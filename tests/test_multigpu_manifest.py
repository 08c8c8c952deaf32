"""k8s/variants/service-2gpu.yaml, the 2-GPU variant of service.yaml, checked without a cluster.

* The same checks as service.yaml (the helpers of tests/test_manifests.py, imported): Knative Serving's admission
  rules and feature flags, the pod template and the PVC against kubernetes-validate, env names and values the app
  accepts, the autoscaling and cold-start relations.
* Variant-specific: nvidia.com/gpu == GPUS_PER_POD == 2, bf16, DEVICE not pinned to one card, and the placement plan
  (function/engine/placement.py) for two cards of the node selector's GPU holds every slot the manifest admits
  (MAX_NUM_SEQS x MAX_MODEL_LEN, containerConcurrency), while one such card cannot hold the model at all.
* Everything else is service.yaml's, field for field, so the variant cannot drift from it silently.
"""
from __future__ import annotations

import json

import pytest
from transformers import Glm4vConfig

from function.engine.placement import PlacementError, plan, weight_bytes_per_param
from test_manifests import (
    AUTOSCALING, CONTAINER_COLD_START_S, GPU, IMAGE_PULL_S, K8S_VERSIONS, KPA, MAX_REVISION_TIMEOUT_SECONDS, MODEL,
    NODE_PROVISION_S, ROOT, SERVICE_YAML, STANDARD_ENV, _ann_num, annotations, app_config, container, env_of,
    go_duration, is_knative, k8s_errors, knative_service_check, load_docs, one, pod_from_ksvc, startup_window_s,
    template,
)
from function.config import ENV_VARS

VARIANT_YAML = ROOT / "k8s" / "variants" / "service-2gpu.yaml"
DOCS = load_docs(VARIANT_YAML)
VARIANT = DOCS[0]

# Total memory (bytes) of the GPU products the node selector may name, as nvidia-smi / torch report it.
CARD_BYTES = {
    "NVIDIA-L4": 23034 * 2**20,
    "NVIDIA-A10G": 23028 * 2**20,
    "NVIDIA-GeForce-RTX-4090": 24564 * 2**20,
    "NVIDIA-RTX-A5000": 24564 * 2**20,
}
# The environment variables in which the variant differs from service.yaml, and nothing else.
VARIANT_ENV = {"GPUS_PER_POD", "MAX_MODEL_LEN"}
# Full-size GLM-4.1V-9B shapes (transformers' Glm4vConfig defaults: 40 layers, hidden 4096, 2 KV heads).
FULL = Glm4vConfig()


def gpus(ksvc: dict) -> int:
    return int(container(ksvc)["resources"]["limits"][GPU])


def product(ksvc: dict) -> str:
    return template(ksvc)["spec"]["nodeSelector"]["nvidia.com/gpu.product"]


def placement_of(ksvc: dict, cards: int | None = None):
    """The plan the app makes at start-up for this manifest's settings on `cards` cards of its GPU product."""
    cfg = app_config(container(ksvc))
    n = gpus(ksvc) if cards is None else cards
    dtype_bytes = 2   # bf16 on CUDA (DTYPE=auto)
    return plan(FULL, cfg.gpus_per_pod if cards is None else n, [CARD_BYTES[product(ksvc)]] * n,
                weight_bytes_per_param(cfg.quantization if cfg.quantization != "auto" else "nf4", dtype_bytes),
                max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                utilization=cfg.gpu_memory_utilization, quantize_vision=cfg.quantize_vision, device=cfg.device)


def variant_errors(ksvc: dict) -> list[str]:
    """What makes a 2-GPU variant wrong, beyond Knative's and Kubernetes' own rules."""
    errs = []
    c = container(ksvc)
    cfg = app_config(c)
    res = c["resources"]
    if res["limits"].get(GPU) != str(cfg.gpus_per_pod) or cfg.gpus_per_pod < 2:
        errs.append(f"nvidia.com/gpu {res['limits'].get(GPU)!r} != GPUS_PER_POD={cfg.gpus_per_pod} (>= 2)")
    if GPU in res.get("requests", {}) and res["requests"][GPU] != res["limits"][GPU]:
        errs.append("a GPU request must equal the limit")
    if cfg.quantization != "none":
        errs.append(f"QUANTIZATION={cfg.quantization}: the variant serves bf16")
    if cfg.device.startswith("cuda:") or cfg.device == "cpu" or not cfg.require_gpu:
        errs.append(f"DEVICE={cfg.device} / REQUIRE_GPU={cfg.require_gpu}: the split needs every visible card")
    if product(ksvc) not in CARD_BYTES:
        return errs + [f"unknown GPU product {product(ksvc)!r}: add its memory to CARD_BYTES"]
    try:
        p = placement_of(ksvc)
    except PlacementError as e:
        return errs + [f"placement: {e}"]
    if (p.kv_slots, p.max_len) != (cfg.max_num_seqs, cfg.max_model_len):
        errs.append(f"the cards hold {p.kv_slots} slots x {p.max_len} tokens, not MAX_NUM_SEQS={cfg.max_num_seqs} x "
                    f"MAX_MODEL_LEN={cfg.max_model_len}")
    cc = template(ksvc)["spec"]["containerConcurrency"]
    if cc > p.kv_slots:
        errs.append(f"containerConcurrency {cc} > the {p.kv_slots} slots the cards hold")
    return errs


# ------------------------------------------------------------------------------------------ shape of the file

def test_variant_is_a_knative_service_first_then_the_pvc():
    """`kn service create --filename` reads the first document only; the PVC makes the file apply on its own."""
    assert [(d["apiVersion"], d["kind"]) for d in DOCS] == [("serving.knative.dev/v1", "Service"),
                                                             ("v1", "PersistentVolumeClaim")]
    assert all("namespace" not in d["metadata"] for d in DOCS)
    # k8s/*.yaml is applied (and tested) as one deployment together with service.yaml; this file replaces it
    assert VARIANT_YAML.parent.name == "variants" and VARIANT_YAML not in (ROOT / "k8s").glob("*.yaml")


def test_variant_replaces_the_one_gpu_service():
    """Same name and labels: the Trigger (k8s/eventing.yaml) and the cache front's MODEL_URL reach it unchanged."""
    assert VARIANT["metadata"] == MODEL["metadata"]
    assert DOCS[1] == load_docs(SERVICE_YAML)[1], "the PVC is service.yaml's"


# ------------------------------------------------------------------------------------------ the same checks as service.yaml

def test_variant_passes_servings_validation_with_the_documented_flags():
    errs, flags = knative_service_check(VARIANT)
    assert not errs, "\n".join(errs)
    assert flags == knative_service_check(MODEL)[1], "no feature flag beyond service.yaml's"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_variant_validates_as_kubernetes_objects(version):
    assert k8s_errors(pod_from_ksvc(VARIANT), version) is None
    for d in DOCS:
        if not is_knative(d):
            assert k8s_errors(d, version) is None


def test_variant_env_is_settings_the_app_accepts():
    c = container(VARIANT)
    assert {e["name"] for e in c["env"]} <= set(ENV_VARS) | STANDARD_ENV
    cfg = app_config(c)        # Config.from_env + validate
    assert cfg.role == "model" and cfg.served_model_name == app_config(container(MODEL)).served_model_name


def test_variant_autoscaling_relations():
    cfg = app_config(container(VARIANT))
    cc = template(VARIANT)["spec"]["containerConcurrency"]
    target, utilization = _ann_num(VARIANT, "target"), _ann_num(VARIANT, "target-utilization-percentage")
    anns = annotations(VARIANT)
    assert anns[AUTOSCALING + "class"] == KPA and anns[AUTOSCALING + "metric"] == "concurrency"
    assert 0 < target <= cc and target * utilization / 100 <= cc
    assert 1 <= cc <= cfg.max_num_seqs + cfg.queue_limit and target <= cfg.max_num_seqs
    lo, hi, init = (int(_ann_num(VARIANT, k)) for k in ("min-scale", "max-scale", "initial-scale"))
    assert lo == 0 and 1 <= hi and lo <= init <= hi
    assert anns[AUTOSCALING + "target-burst-capacity"] == "-1"
    # Scaled to this pod: it runs on 24 GB-class cards, one after the other, with less compute and bandwidth than
    # service.yaml's H100 pod, so its soft target is not above that pod's; the hard limit is what the cards hold.
    assert target <= _ann_num(MODEL, "target")
    assert cc <= placement_of(VARIANT).kv_slots
    # The same GPU budget as service.yaml: max-scale x GPUs per pod.
    assert hi * gpus(VARIANT) <= int(_ann_num(MODEL, "max-scale")) * gpus(MODEL)


def test_variant_timeouts_and_cold_start_budget():
    spec, c = template(VARIANT)["spec"], container(VARIANT)
    cfg = app_config(c)
    assert cfg.request_timeout_s < spec["timeoutSeconds"] <= MAX_REVISION_TIMEOUT_SECONDS
    window = startup_window_s(c)
    assert window >= CONTAINER_COLD_START_S
    progress = go_duration(annotations(VARIANT)["serving.knative.dev/progress-deadline"])
    assert progress >= window + IMAGE_PULL_S + NODE_PROVISION_S


# ------------------------------------------------------------------------------------------ variant-specific

def test_two_gpus_everywhere():
    c = container(VARIANT)
    cfg = app_config(c)
    assert gpus(VARIANT) == cfg.gpus_per_pod == 2
    assert GPU not in c["resources"].get("requests", {})
    assert cfg.quantization == "none" and cfg.device in ("cuda", "auto") and cfg.require_gpu
    assert variant_errors(VARIANT) == []


def test_the_cards_hold_what_the_manifest_admits():
    cfg = app_config(container(VARIANT))
    p = placement_of(VARIANT)
    assert (p.kv_slots, p.max_len) == (cfg.max_num_seqs, cfg.max_model_len) and not p.notes
    assert p.device_map["lm_head"] == "cuda:1" and p.device_map["model.visual"] == "cuda:0"
    # and the same settings on one such card do not fit: the reason for the variant
    with pytest.raises(PlacementError, match="does not fit on 1 GPU"):
        placement_of(VARIANT, cards=1)


def test_resources_are_sized_for_two_cards():
    res, base = container(VARIANT)["resources"], container(MODEL)["resources"]

    def gi(q: str) -> int:
        assert q.endswith("Gi"), q
        return int(q[:-2])

    assert res["requests"]["memory"] == res["limits"]["memory"], "GPU pods: memory request == limit"
    assert gi(res["limits"]["memory"]) > gi(base["limits"]["memory"]), "a second CUDA context, bf16 shards"
    assert "cpu" in res["requests"] and "cpu" not in res["limits"]
    assert list(template(VARIANT)["spec"]["nodeSelector"]) == list(template(MODEL)["spec"]["nodeSelector"])
    assert CARD_BYTES[product(VARIANT)] < 32 * 2**30, "a 24 GB-class card"


def test_everything_else_is_service_yamls():
    """Normalise the variant's intended differences to service.yaml's values: the rest must be identical."""
    v = json.loads(json.dumps(VARIANT))
    m = MODEL
    anns = annotations(v)
    for key in ("target", "max-scale"):
        anns[AUTOSCALING + key] = annotations(m)[AUTOSCALING + key]
    template(v)["spec"]["nodeSelector"] = template(m)["spec"]["nodeSelector"]
    vc = container(v)
    vc["resources"] = container(m)["resources"]
    base_env = {e["name"]: e for e in container(m)["env"]}
    assert {e["name"] for e in vc["env"]} ^ set(base_env) <= VARIANT_ENV
    assert {n for n, val in env_of(vc).items() if env_of(container(m)).get(n) != val} == VARIANT_ENV
    vc["env"] = [base_env[e["name"]] for e in vc["env"] if e["name"] in base_env]
    assert v == m


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["resources"]["limits"].update({GPU: "1"}), "!= GPUS_PER_POD=2"),
    (lambda c: _set_env(c, "GPUS_PER_POD", "1"), "!= GPUS_PER_POD=1"),
    (lambda c: _set_env(c, "QUANTIZATION", "nf4"), "serves bf16"),
    (lambda c: _set_env(c, "DEVICE", "cuda:0"), "needs every visible card"),
    (lambda c: _set_env(c, "MAX_MODEL_LEN", "16384"), "not MAX_NUM_SEQS=32 x MAX_MODEL_LEN=16384"),
    (lambda c: _set_env(c, "GPU_MEMORY_UTILIZATION", "0.5"), "does not fit"),
])
def test_variant_checks_catch_mistakes(mutate, expected):
    v = json.loads(json.dumps(VARIANT))
    mutate(container(v))
    errs = variant_errors(v)
    assert any(expected in e for e in errs), errs


def _set_env(c: dict, name: str, value: str) -> None:
    (e,) = [e for e in c["env"] if e["name"] == name]
    e["value"] = value


def test_containerconcurrency_above_the_slots_is_caught():
    v = json.loads(json.dumps(VARIANT))
    _set_env(container(v), "MAX_NUM_SEQS", "48")
    template(v)["spec"]["containerConcurrency"] = 48
    assert any("slots" in e for e in variant_errors(v))


def test_docs_describe_the_variant():
    doc = (ROOT / "docs" / "multigpu.md").read_text()
    assert "k8s/variants/service-2gpu.yaml" in doc and "GPUS_PER_POD" in doc
    assert "docs/multigpu.md" in VARIANT_YAML.read_text()
    one("Service", MODEL["metadata"]["name"], "serving.knative.dev/")   # service.yaml itself is untouched
