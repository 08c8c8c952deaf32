"""The deploy scripts, checked without a cluster: syntax (bash -n, shellcheck when installed), --help, and their
--dry-run output, with fake kubectl/kn/func/docker on PATH that record any call (a dry run must make none that
changes anything).

The dry-run output is checked against the manifests: the rendered manifests carry the image, namespace and GPU
product asked for and nothing else changes; the feature-flag patches enable exactly the flags the manifests need;
and func-deploy.sh's JSON patch, applied to the Service that `func deploy` generates from func.yaml, yields a Service
with everything service.yaml has that passes the same Knative and Kubernetes checks.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from test_manifests import (
    AUTOSCALING, FUNC, FRONT, GPU, JOB, K8S_VERSIONS, MODEL, ROOT, SERVICE_YAML, annotations, app_config, container,
    env_of, k8s_errors, knative_service_check, load_docs, mounts_of, pod_from_ksvc, required_eventing_flags,
    required_serving_flags, template,
)

SCRIPTS = ROOT / "scripts"
PREPULL_YAML = ROOT / "k8s" / "prepull.yaml"
ENTRY_SCRIPTS = ["deploy.sh", "func-deploy.sh", "prequantize-job.sh", "broker-trigger.sh",
                 "enable-knative-features.sh"]
ALL_SCRIPTS = [*ENTRY_SCRIPTS, "deploy-lib.sh"]
IMAGE = "ghcr.io/acme/autoglm-phone-9b:1.2.3"
GPU_PRODUCT = "NVIDIA-L4"
NS = "prod"


# =================================================================================================================
# Running the scripts
# =================================================================================================================

@pytest.fixture
def fake_tools(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with fake kubectl/kn/func/docker first: they log their argv and fail, except `kubectl config view`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("kubectl", "kn", "func", "docker"):
        script = bin_dir / tool
        script.write_text(f"""#!/usr/bin/env bash
printf '%s %s\\n' {tool} "$*" >> {shlex.quote(str(log))}
[[ "$1 $2" == "config view" ]] && exit 0
echo "fake {tool}: no cluster in tests" >&2
exit 1
""")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("DRY_RUN", None)
    env.pop("SHOW_MANIFESTS", None)
    return env, log


def run_script(name: str, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(SCRIPTS / name), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, f"{name} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def dry_run(fake_tools, name: str, *args: str, show: bool = True) -> str:
    env, log = fake_tools
    if show:
        env = {**env, "SHOW_MANIFESTS": "1"}
    out = run_script(name, *args, "--dry-run", env=env).stdout
    calls = log.read_text().splitlines() if log.exists() else []
    assert all(c.startswith("kubectl config view") for c in calls), f"a dry run called: {calls}"
    return out


def commands(out: str) -> list[list[str]]:
    """The commands a dry run printed ("+ cmd args..."), split as the shell would."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def shown_manifests(out: str) -> list[list[dict]]:
    """The manifests printed after the commands that use them (SHOW_MANIFESTS=1: lines prefixed "| "), in order."""
    blocks, cur = [], []
    for line in out.splitlines():
        if line.startswith("| "):
            cur.append(line[2:])
        elif line == "|":
            cur.append("")
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return [[d for d in yaml.safe_load_all("\n".join(b)) if d] for b in blocks]


def lib(expr: str) -> str:
    return subprocess.run(["bash", "-c", f'source scripts/deploy-lib.sh; {expr}'], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


# =================================================================================================================
# Syntax and conventions
# =================================================================================================================

@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", "-x", *[f"scripts/{s}" for s in ALL_SCRIPTS]], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_strict_mode_help_and_bad_arguments(name, fake_tools):
    text = (SCRIPTS / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(SCRIPTS / name, os.X_OK)
    env, _ = fake_tools
    for flag in ("--help", "-h"):
        out = run_script(name, flag, env=env).stdout
        assert out.startswith("Usage: scripts/" + name) and "--dry-run" in out
    bad = run_script(name, "--no-such-option", env=env, check=False)
    assert bad.returncode != 0 and "unknown argument" in bad.stderr


def test_lib_defaults_match_the_manifests():
    values = lib('printf "%s\\n" "$DEFAULT_IMAGE" "$DEFAULT_GPU_PRODUCT" "$SERVICE_NAME" "$CACHE_FRONT_NAME" '
                 '"$PVC_NAME" "$JOB_NAME" "$BROKER_NAME" "$TRIGGER_NAME" "$SERVED_MODEL_NAME"').splitlines()
    image, gpu, svc, front, pvc, job, broker, trigger, model = values
    assert image == container(MODEL)["image"] == container(FRONT)["image"] == JOB["spec"]["template"]["spec"][
        "containers"][0]["image"]
    assert gpu == template(MODEL)["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert (svc, front) == (MODEL["metadata"]["name"], FRONT["metadata"]["name"])
    assert pvc == template(MODEL)["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert job == JOB["metadata"]["name"]
    assert model == app_config(container(MODEL)).served_model_name
    eventing = load_docs(ROOT / "k8s" / "eventing.yaml")
    assert broker == next(d for d in eventing if d["kind"] == "Broker")["metadata"]["name"]
    assert trigger == next(d for d in eventing if d["kind"] == "Trigger")["metadata"]["name"]
    assert set(lib('printf "%s\\n" "${SERVING_FEATURE_FLAGS[@]}"').split()) == required_serving_flags()
    assert set(lib('printf "%s\\n" "${EVENTING_FEATURE_FLAGS[@]}"').split()) == required_eventing_flags()


def test_render_with_the_defaults_changes_nothing_and_select_docs_splits():
    for path in (SERVICE_YAML, ROOT / "k8s" / "cache-front.yaml", ROOT / "k8s" / "prequantize-job.yaml",
                 PREPULL_YAML):
        out = lib(f'render {shlex.quote(str(path))} "$DEFAULT_IMAGE" default "$DEFAULT_GPU_PRODUCT"')
        assert out == path.read_text()
    ksvc = lib(f'select_docs Service serving.knative.dev/ < {SERVICE_YAML}')
    assert [d for d in yaml.safe_load_all(ksvc) if d] == [MODEL]
    pvc = lib(f'select_docs PersistentVolumeClaim < {SERVICE_YAML}')
    assert [d["kind"] for d in yaml.safe_load_all(pvc) if d] == ["PersistentVolumeClaim"]


# =================================================================================================================
# deploy.sh
# =================================================================================================================

def _expect_rendered(docs: list[dict], original: list[dict]) -> None:
    """Rendered == original, except the image, the GPU product and the namespace in cluster-local URLs."""
    text = json.dumps(original).replace(container(MODEL)["image"], IMAGE).replace(
        template(MODEL)["spec"]["nodeSelector"]["nvidia.com/gpu.product"], GPU_PRODUCT).replace(
        ".default.svc.cluster.local", f".{NS}.svc.cluster.local")
    assert docs == json.loads(text)


def test_deploy_kubectl_dry_run(fake_tools):
    out = dry_run(fake_tools, "deploy.sh", "-n", NS, "--image", IMAGE, "--gpu-product", GPU_PRODUCT)
    cmds = commands(out)
    applies = [c for c in cmds if c[:2] == ["kubectl", "apply"]]
    assert len(applies) == 2 and all(a[2:4] == ["-n", NS] for a in applies)
    # the image pre-pull first (rendered with the same image and GPU product), then the Service
    prepull, manifest = shown_manifests(out)
    _expect_rendered(prepull, load_docs(PREPULL_YAML))
    ds = prepull[0]
    assert ds["spec"]["template"]["spec"]["initContainers"][0]["image"] == IMAGE
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": GPU_PRODUCT}
    _expect_rendered(manifest, load_docs(SERVICE_YAML))
    ksvc = next(d for d in manifest if d["kind"] == "Service")
    assert container(ksvc)["image"] == IMAGE and template(ksvc)["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": GPU_PRODUCT}
    # It reads the feature flags, waits for the Service and prints its URL and a working request.
    assert ["kubectl", "get", "configmap", "config-features", "-n", "knative-serving"] == cmds[0][:6]
    waits = [c for c in cmds if c[:3] == ["kubectl", "get", "ksvc"]]
    assert waits[0][3:6] == [MODEL["metadata"]["name"], "-n", NS] and "latestReadyRevisionName" in waits[0][-1]
    assert "/v1/chat/completions" in out
    body = re.search(r"-d '(\{.*\})'", out).group(1)
    request = json.loads(body)
    assert request["model"] == app_config(container(MODEL)).served_model_name and request["messages"]


def test_deploy_kn_dry_run(fake_tools):
    out = dry_run(fake_tools, "deploy.sh", "--method", "kn", "-n", NS, "--image", IMAGE, "--gpu-product",
                  GPU_PRODUCT)
    cmds = commands(out)
    (kn,) = [c for c in cmds if c[0] == "kn"]
    assert kn[:6] == ["kn", "service", "create", MODEL["metadata"]["name"], "-n", NS]
    assert "--filename" in kn and "--force" in kn
    prepull, pvc_docs, ksvc_docs = shown_manifests(out)
    _expect_rendered(prepull, load_docs(PREPULL_YAML))
    assert [d["kind"] for d in pvc_docs] == ["PersistentVolumeClaim"]
    _expect_rendered(ksvc_docs, [MODEL])
    # The PVC is applied before the Service is created.
    assert cmds.index(next(c for c in cmds if c[:2] == ["kubectl", "apply"])) < cmds.index(kn)


def test_deploy_everything_dry_run(fake_tools):
    out = dry_run(fake_tools, "deploy.sh", "-n", NS, "--image", IMAGE, "--gpu-product", GPU_PRODUCT,
                  "--with-prequantize", "--with-cache-front", "--with-eventing", "--enable-features",
                  "--with-schedule")
    cmds = commands(out)
    patches = {c[c.index("-n") + 1]: json.loads(c[c.index("-p") + 1])["data"]
               for c in cmds if c[:3] == ["kubectl", "patch", "configmap"]}
    assert set(patches["knative-serving"]) == required_serving_flags()
    assert set(patches["knative-eventing"]) == required_eventing_flags()
    assert all(v == "enabled" for p in patches.values() for v in p.values())
    assert ["kubectl", "delete", "job", JOB["metadata"]["name"], "-n", NS] == [
        c for c in cmds if c[:3] == ["kubectl", "delete", "job"]][0][:6]
    manifests = shown_manifests(out)
    kinds = [[d["kind"] for d in m] for m in manifests]
    assert kinds == [["DaemonSet"], ["PersistentVolumeClaim"], ["Job"], ["Service", "PersistentVolumeClaim"],
                     ["Service", "Deployment", "Service", "NetworkPolicy"],
                     ["Broker", "Trigger", "Service"],
                     ["ServiceAccount", "Role", "RoleBinding", "CronJob", "CronJob"]]
    _expect_rendered(manifests[2], [JOB])
    _expect_rendered(manifests[4], load_docs(ROOT / "k8s" / "cache-front.yaml"))
    assert manifests[6] == load_docs(ROOT / "k8s" / "schedule.yaml")
    front = manifests[4][0]
    assert env_of(container(front))["MODEL_URL"] == f"http://{MODEL['metadata']['name']}.{NS}.svc.cluster.local"
    # Order: flags, pre-pull, model cache (PVC, Job, wait), model Service (apply, wait), cache front, broker,
    # schedule.
    order = [c[:3] for c in cmds if c[:2] in (["kubectl", "patch"], ["kubectl", "apply"], ["kubectl", "wait"])]
    assert order[:2] == [["kubectl", "patch", "configmap"]] * 2
    assert [c for c in order if c[1] != "patch"] == [["kubectl", "apply", "-n"]] * 6 + [
        ["kubectl", "wait", "--for=condition=Ready"], ["kubectl", "apply", "-n"]]


def test_deploy_without_prepull(fake_tools):
    out = dry_run(fake_tools, "deploy.sh", "-n", NS, "--image", IMAGE, "--no-prepull")
    assert [[d["kind"] for d in m] for m in shown_manifests(out)] == [["Service", "PersistentVolumeClaim"]]


# =================================================================================================================
# func-deploy.sh: func deploy + the GPU patch == service.yaml
# =================================================================================================================

def func_generated_service(func: dict, image: str) -> dict:
    """The Knative Service `func deploy` creates from func.yaml (knative/func pkg/knative/deployer.go:
    generateNewService, processEnvs, processVolumes, setHealthEndpoints, setServiceOptions)."""
    d = func["deploy"]
    c = {"image": image,
         "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                             "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
         "livenessProbe": {"httpGet": {"path": d["healthEndpoints"]["liveness"]}},
         "readinessProbe": {"httpGet": {"path": d["healthEndpoints"]["readiness"]}},
         "env": [{"name": e["name"], "value": e["value"]} for e in func["run"]["envs"]],
         "volumeMounts": []}
    volumes = []
    for i, v in enumerate(func["run"]["volumes"]):
        name = f"func-volume-{i}"
        src = {k: val for k, val in v.items() if k != "path"}
        volumes.append({"name": name, **src})
        c["volumeMounts"].append({"name": name, "mountPath": v["path"]})
    service_anns = {"dapr.io/app-id": func["name"], "dapr.io/enabled": "false", "dapr.io/metrics-port": "9092",
                    "dapr.io/app-port": "8080", "dapr.io/enable-api-logging": "false", **d.get("annotations", {})}
    # Scale options go on the revision template only.
    anns = dict(service_anns)
    scale = d["options"]["scale"]
    anns.update({AUTOSCALING + "min-scale": "%d" % scale["min"], AUTOSCALING + "max-scale": "%d" % scale["max"],
                 AUTOSCALING + "metric": scale["metric"], AUTOSCALING + "target": "%f" % scale["target"],
                 AUTOSCALING + "target-utilization-percentage": "%f" % scale["utilization"]})
    res = d["options"]["resources"]
    c["resources"] = {"requests": dict(res["requests"]),
                      "limits": {k: v for k, v in res["limits"].items() if k != "concurrency"}}
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": func["name"], "annotations": service_anns},
            "spec": {"template": {"metadata": {"annotations": anns},
                                  "spec": {"containerConcurrency": res["limits"]["concurrency"],
                                           "containers": [c], "volumes": volumes}}}}


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 'add' (the only op the script uses): the parent must exist, an existing member is replaced."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]     # KeyError: the parent does not exist
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            node[last] = op["value"]
    return doc


def _func_deploy_patch(fake_tools, *extra: str) -> tuple[list[list[str]], list[dict]]:
    out = dry_run(fake_tools, "func-deploy.sh", "--image", IMAGE, "-n", NS, *extra)
    cmds = commands(out)
    (patch,) = [c for c in cmds if c[:3] == ["kubectl", "patch", "ksvc"]]
    assert patch[3:6] == [MODEL["metadata"]["name"], "-n", NS] and "--type=json" in patch
    return cmds, json.loads(patch[patch.index("-p") + 1])


def test_func_deploy_runs_func_without_building(fake_tools):
    cmds, _ = _func_deploy_patch(fake_tools)
    (func,) = [c for c in cmds if c[0] == "func"]
    assert func[:2] == ["func", "deploy"]
    assert {"--build=false", "--push=false"} <= set(func)
    assert func[func.index("--image") + 1] == IMAGE and func[func.index("--namespace") + 1] == NS
    assert func[func.index("--path") + 1] == str(ROOT)
    names = [c[:3] for c in cmds]
    assert names.index(["func", "deploy", "--path"]) < names.index(["kubectl", "patch", "ksvc"]) \
        < max(i for i, n in enumerate(names) if n == ["kubectl", "get", "ksvc"])
    cmds, _ = _func_deploy_patch(fake_tools, "--build")
    assert ["docker", "build", "-t", IMAGE, str(ROOT)] in cmds and ["docker", "push", IMAGE] in cmds


def test_func_deploy_needs_an_image(fake_tools):
    env, _ = fake_tools
    proc = run_script("func-deploy.sh", "--dry-run", env=env, check=False)
    assert proc.returncode != 0 and "--image is required" in proc.stderr


def test_func_deploy_patch_turns_func_output_into_service_yaml(fake_tools):
    _, ops = _func_deploy_patch(fake_tools)
    generated = func_generated_service(FUNC, IMAGE)
    # What func deploy alone produces is valid but has no GPU: that is what the patch is for.
    assert not knative_service_check(generated)[0]
    assert GPU not in container(generated)["resources"]["limits"]
    patched = json_patch(generated, ops)
    want, got = template(MODEL), template(patched)

    # Every revision annotation of service.yaml, with the same value (func writes numbers as %f).
    for key, value in annotations(MODEL).items():
        have = annotations(patched).get(key)
        assert have is not None, f"{key} missing after func deploy + patch"
        try:
            assert float(have) == float(value), key
        except ValueError:
            assert have == value, key
    for key in ("containerConcurrency", "timeoutSeconds", "nodeSelector", "tolerations"):
        assert got["spec"][key] == want["spec"][key], key
    gc, wc = container(patched), container(MODEL)
    for key in ("resources", "startupProbe", "livenessProbe", "securityContext"):
        assert gc[key] == wc[key], key
    assert gc["readinessProbe"]["httpGet"]["path"] == wc["readinessProbe"]["httpGet"]["path"]
    assert env_of(gc) == env_of(wc)
    strip = lambda m: {p: {k: v for k, v in s.items() if k != "name"} for p, s in m.items()}   # noqa: E731
    assert strip(mounts_of(got["spec"], gc)) == strip(mounts_of(want["spec"], wc))
    # And the cluster would accept it.
    errs, flags = knative_service_check(patched)
    assert not errs, errs
    assert flags - {"kubernetes.podspec-volumes-emptydir"} <= required_serving_flags()
    assert k8s_errors(pod_from_ksvc(patched), K8S_VERSIONS[0]) is None


def test_func_deploy_patch_takes_the_gpu_product(fake_tools):
    _, ops = _func_deploy_patch(fake_tools, "--gpu-product", GPU_PRODUCT)
    patched = json_patch(func_generated_service(FUNC, IMAGE), ops)
    assert template(patched)["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": GPU_PRODUCT}


# =================================================================================================================
# prequantize-job.sh, broker-trigger.sh, enable-knative-features.sh
# =================================================================================================================

def test_prequantize_job_dry_run(fake_tools):
    out = dry_run(fake_tools, "prequantize-job.sh", "-n", NS, "--image", IMAGE, "--gpu-product", GPU_PRODUCT)
    cmds = commands(out)
    pvc, job = shown_manifests(out)
    assert [d["kind"] for d in pvc] == ["PersistentVolumeClaim"]
    _expect_rendered(job, [JOB])
    kinds = [c[:3] for c in cmds]
    assert kinds.index(["kubectl", "delete", "job"]) < kinds.index(["kubectl", "apply", "-n"], 1)
    assert any(c[:4] == ["kubectl", "get", "job", JOB["metadata"]["name"]] for c in cmds)


@pytest.mark.parametrize("quant", ["none", "bf16"])
def test_prequantize_none_is_a_no_op(tmp_path, quant):
    """The Job's second step with the shipped QUANTIZATION=none: exit 0, says bf16 needs no pre-quantized copy, writes
    nothing; it still checks that the download left a checkpoint (exit 2 without config.json)."""
    import sys
    ckpt, cache = tmp_path / "ckpt", tmp_path / "cache"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTIZATION", "MODEL_PATH", "MODEL_CACHE_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, str(SCRIPTS / "prequantize.py"), "--quantization", quant, "--cache-dir", str(cache)]
    r = subprocess.run([*cmd, "--model-path", str(ckpt)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "not-needed" and out["quantization"] == "none"
    assert "no pre-quantized copy" in out["message"] and "bf16" in out["message"]
    assert not cache.exists() or not any(cache.rglob("*"))
    missing = subprocess.run([*cmd, "--model-path", str(tmp_path / "absent")], env=env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "config.json" in missing.stderr


def test_broker_trigger_dry_run(fake_tools):
    out = dry_run(fake_tools, "broker-trigger.sh", "-n", NS, show=False)
    cmds = commands(out)
    assert ["kubectl", "apply", "-n", NS, "-f", str(ROOT / "k8s" / "eventing.yaml")] in cmds
    (wait,) = [c for c in cmds if c[:2] == ["kubectl", "wait"]]
    assert {"broker/autoglm", "trigger/autoglm-chat-requests"} <= set(wait)
    cfg = app_config(container(MODEL))
    assert f"Ce-Type: {cfg.ce_request_type}" in out and "Ce-Specversion: 1.0" in out
    assert cfg.ce_response_type in out
    body = json.loads(re.search(r"-d '(\{.*\})'", out).group(1))
    assert body["model"] == cfg.served_model_name
    env, _ = fake_tools
    help_text = run_script("broker-trigger.sh", "--help", env=env).stdout
    assert f"func subscribe --source autoglm --filter type={cfg.ce_request_type}" in help_text


def test_enable_features_dry_run(fake_tools):
    out = dry_run(fake_tools, "enable-knative-features.sh", show=False)
    patches = {c[c.index("-n") + 1]: json.loads(c[c.index("-p") + 1]) for c in commands(out)}
    assert set(patches) == {"knative-serving", "knative-eventing"}
    assert set(patches["knative-serving"]["data"]) == required_serving_flags()
    assert set(patches["knative-eventing"]["data"]) == required_eventing_flags()
    only_serving = dry_run(fake_tools, "enable-knative-features.sh", "--no-eventing", show=False)
    assert [c[c.index("-n") + 1] for c in commands(only_serving)] == ["knative-serving"]


# =================================================================================================================
# The waiting and checking helpers, against a scripted kubectl
# =================================================================================================================

def _with_kubectl(tmp_path: Path, body: str, expr: str) -> subprocess.CompletedProcess:
    """Run `expr` after sourcing deploy-lib.sh, with a fake kubectl whose behaviour is the bash `body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "kubectl"
    fake.write_text("#!/usr/bin/env bash\n" + body + "\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "0"}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/deploy-lib.sh; {expr}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("status, ok", [
    ("3|3|True|svc-00003|svc-00003|", True),             # newest generation observed, latest revision ready
    ("3|3|False|svc-00003|svc-00002|RevisionFailed: ProgressDeadlineExceeded", False),   # fails fast
    ("3|2|True|svc-00002|svc-00002|", False),            # old status: not ready yet (times out at 0 s)
    ("3|3|Unknown|svc-00003|svc-00002|", False),         # still starting (times out at 0 s)
])
def test_wait_ksvc_ready(tmp_path, status, ok):
    body = f'case "$*" in *"get ksvc"*) printf %s {shlex.quote(status)} ;; *) exit 0 ;; esac'
    proc = _with_kubectl(tmp_path, body, "wait_ksvc_ready svc ns 0")
    assert (proc.returncode == 0) == ok, proc.stderr


@pytest.mark.parametrize("values, ok", [
    ({}, True),
    ({"kubernetes.podspec-tolerations": "allowed"}, True),
    ({"kubernetes.podspec-persistent-volume-write": "allowed"}, False),   # PVC writes need "enabled"
    ({"kubernetes.podspec-nodeselector": "disabled"}, False),
    ({"kubernetes.podspec-persistent-volume-claim": ""}, False),
])
def test_check_serving_features(tmp_path, values, ok):
    # kubectl is asked for jsonpath={.data.kubernetes\.podspec-...}: match on the part after the dot.
    cases = "".join(f"  *{shlex.quote(flag.split('.', 1)[1])}*) printf %s {shlex.quote(v)} ;;\n"
                    for flag, v in values.items())
    body = f'case "$*" in\n{cases}  *config-features*) printf Enabled ;;\n  *) exit 0 ;;\nesac'
    proc = _with_kubectl(tmp_path, body, "check_serving_features")
    assert (proc.returncode == 0) == ok, proc.stderr


def test_func_deploy_end_to_end_against_scripted_tools(tmp_path):
    """The non-dry path: func deploy "fails" (its 120 s wait), the Service exists, the patch is applied, the new
    revision becomes ready, and func's GPU-less revision is deleted."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "func").write_text(f'#!/usr/bin/env bash\necho "func $*" >> {log}\necho "timeout" >&2\nexit 1\n')
    (bin_dir / "kubectl").write_text(f"""#!/usr/bin/env bash
echo "kubectl $*" >> {log}
case "$*" in
  "config view"*) exit 0 ;;
  *latestCreatedRevisionName}}) printf svc-00002 ;;
  *latestReadyRevisionName}}) printf svc-00003 ;;
  *"get ksvc"*"observedGeneration"*) printf '5|5|True|svc-00003|svc-00003|' ;;
  *"get ksvc"*"status.url"*) printf http://autoglm-phone-9b.prod.example.com ;;
  *"get revision svc-00002"*) printf '' ;;
  *) exit 0 ;;
esac
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = run_script("func-deploy.sh", "--image", IMAGE, "-n", NS, env=env)
    calls = log.read_text().splitlines()
    order = [c.split()[0] + " " + c.split()[1] for c in calls]
    assert order.index("func deploy") < order.index("kubectl patch") < order.index("kubectl delete")
    assert f"kubectl delete revision svc-00002 -n {NS} --ignore-not-found" in calls
    assert "http://autoglm-phone-9b.prod.example.com/v1/chat/completions" in proc.stdout


@pytest.mark.parametrize("flags_on", [True, False])
def test_deploy_end_to_end_against_scripted_kubectl(tmp_path, flags_on):
    """The non-dry path of deploy.sh: prerequisites, feature-flag check, apply of the rendered manifest, wait, URL."""
    log = tmp_path / "calls.log"
    applied = tmp_path / "applied.yaml"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f"""#!/usr/bin/env bash
echo "kubectl $*" >> {log}
case "$*" in
  "version"*|"get crd"*) exit 0 ;;
  "get nodes -l"*) echo node/gpu-1 ;;
  *config-features*) printf {"enabled" if flags_on else "disabled"} ;;
  "apply "*) cp "${{@: -1}}" {applied} ;;
  *"get ksvc"*"observedGeneration"*) printf '1|1|True|autoglm-phone-9b-00001|autoglm-phone-9b-00001|' ;;
  *"get ksvc"*"status.url"*) printf http://autoglm-phone-9b.prod.example.com ;;
  *) exit 0 ;;
esac
""")
    (bin_dir / "kubectl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = run_script("deploy.sh", "-n", NS, "--image", IMAGE, env=env, check=False)
    if not flags_on:
        assert proc.returncode != 0 and "kubernetes.podspec-nodeselector=disabled" in proc.stderr
        assert not applied.exists()
        return
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(applied.read_text()) if d]
    assert container(docs[0])["image"] == IMAGE and docs[1]["kind"] == "PersistentVolumeClaim"
    assert "curl -sS \"http://autoglm-phone-9b.prod.example.com/v1/chat/completions\"" in proc.stdout
