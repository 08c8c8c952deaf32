#!/usr/bin/env bash
# Deploy with the Knative Functions CLI (func.yaml), then patch in what func.yaml cannot express (the GPU part).
set -euo pipefail

# shellcheck source=scripts/deploy-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"

usage() {
  cat <<EOF
Usage: scripts/func-deploy.sh --image IMAGE [options]

1. (with --build) docker build + push the image from the Dockerfile; func's own builders (pack/s2i) would not
   use the CUDA base image or the flash-attn wheel.
2. func deploy --build=false --push=false --image IMAGE: creates/updates ksvc/$SERVICE_NAME from func.yaml (env,
   volumes, health endpoints, min/max/target/utilization, containerConcurrency).
3. kubectl patch: adds what func.yaml cannot express and what func deploy resets on every deploy: the
   nvidia.com/gpu limit (func rewrites the container's resources), the GPU nodeSelector and toleration, the
   startupProbe, timeoutSeconds, the securityContext, and the revision annotations other than min/max/target/
   utilization/metric (window, scale-down-delay, initial-scale, retention, burst capacity, progress-deadline).
   The values are the ones in service.yaml (the tests check they agree).
4. Waits for the newest revision on its own terms (func deploy gives up after 120 s, far less than a GPU cold start).

func deploy creates one intermediate revision without a GPU (REQUIRE_GPU=true keeps it from ever becoming ready,
so it never receives traffic); the patch creates the real one, and the script deletes the intermediate one once the
real one is ready.

Options:
  --image IMAGE          image built from the Dockerfile (required; func.yaml names none on purpose)
  -n, --namespace NS     namespace (default: the kubeconfig context's, else "default")
  --gpu-product LABEL    nvidia.com/gpu.product of the GPU nodes (default: $DEFAULT_GPU_PRODUCT)
  --build                docker build and push IMAGE first
  --wait-timeout SECONDS how long to wait for readiness (default: 1800, the revision's progress-deadline)
  --dry-run              print the commands instead of running them
  -h, --help             show this help
EOF
}

IMAGE=""
NAMESPACE=""
GPU_PRODUCT="$DEFAULT_GPU_PRODUCT"
BUILD=0
WAIT_TIMEOUT=1800
while (($#)); do
  case "$1" in
    --image) IMAGE="${2:?--image needs a value}"; shift ;;
    -n | --namespace) NAMESPACE="${2:?--namespace needs a value}"; shift ;;
    --gpu-product) GPU_PRODUCT="${2:?--gpu-product needs a value}"; shift ;;
    --build) BUILD=1 ;;
    --wait-timeout) WAIT_TIMEOUT="${2:?--wait-timeout needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$IMAGE" ]] || { usage >&2; die "--image is required"; }
[[ "$WAIT_TIMEOUT" =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds"

need func "deploys from func.yaml"
need kubectl "patches the GPU settings and waits for readiness"
((BUILD)) && need docker "builds the image from the Dockerfile"
NAMESPACE="${NAMESPACE:-$(current_namespace)}"

if ((BUILD)); then
  run docker build -t "$IMAGE" "$REPO_ROOT"
  run docker push "$IMAGE"
fi

# ---- 2. func deploy
# Its built-in wait (120 s) ends before a GPU revision can be ready, and the revision it creates has no GPU, so
# its exit status says nothing about the deployment: what matters is that the Service exists afterwards.
log "func deploy (the GPU settings follow in the next step)"
if [[ "$DRY_RUN" == 1 ]]; then
  print_cmd func deploy --path "$REPO_ROOT" --namespace "$NAMESPACE" --image "$IMAGE" --build=false --push=false
else
  func deploy --path "$REPO_ROOT" --namespace "$NAMESPACE" --image "$IMAGE" --build=false --push=false \
    || warn "func deploy reported an error (expected when its 120 s readiness wait ends); checking the Service"
  kubectl get ksvc "$SERVICE_NAME" -n "$NAMESPACE" >/dev/null \
    || die "func deploy did not create ksvc/$SERVICE_NAME; see its output above"
fi
# The revision func just created (without a GPU); removed once the patched one is ready, instead of holding a pod
# until its progress deadline.
interim=""
if [[ "$DRY_RUN" != 1 ]]; then
  interim="$(kubectl get ksvc "$SERVICE_NAME" -n "$NAMESPACE" -o 'jsonpath={.status.latestCreatedRevisionName}')"
fi

# ---- 3. the GPU part, as a JSON patch (paths: spec.template...; "~1" encodes "/" in annotation keys)
ann='/spec/template/metadata/annotations'
ctr='/spec/template/spec/containers/0'
patch="$(cat <<EOF | tr -d '\n '
[
{"op":"add","path":"$ann/autoscaling.knative.dev~1class","value":"kpa.autoscaling.knative.dev"},
{"op":"add","path":"$ann/autoscaling.knative.dev~1initial-scale","value":"1"},
{"op":"add","path":"$ann/autoscaling.knative.dev~1window","value":"120s"},
{"op":"add","path":"$ann/autoscaling.knative.dev~1scale-down-delay","value":"5m"},
{"op":"add","path":"$ann/autoscaling.knative.dev~1scale-to-zero-pod-retention-period","value":"15m"},
{"op":"add","path":"$ann/autoscaling.knative.dev~1target-burst-capacity","value":"-1"},
{"op":"add","path":"$ann/serving.knative.dev~1progress-deadline","value":"1800s"},
{"op":"add","path":"/spec/template/spec/timeoutSeconds","value":600},
{"op":"add","path":"/spec/template/spec/nodeSelector","value":{"nvidia.com/gpu.product":"$GPU_PRODUCT"}},
{"op":"add","path":"/spec/template/spec/tolerations","value":[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]},
{"op":"add","path":"$ctr/resources","value":{"requests":{"cpu":"6","memory":"40Gi"},"limits":{"memory":"40Gi","nvidia.com/gpu":"1"}}},
{"op":"add","path":"$ctr/startupProbe","value":{"httpGet":{"path":"/health/readiness","port":8080},"periodSeconds":10,"timeoutSeconds":5,"failureThreshold":90}},
{"op":"add","path":"$ctr/livenessProbe","value":{"httpGet":{"path":"/health/liveness","port":8080},"periodSeconds":10,"timeoutSeconds":5,"failureThreshold":6}},
{"op":"add","path":"$ctr/securityContext","value":{"runAsNonRoot":true,"runAsUser":10001,"runAsGroup":10001,"allowPrivilegeEscalation":false,"readOnlyRootFilesystem":true,"capabilities":{"drop":["ALL"]},"seccompProfile":{"type":"RuntimeDefault"}}}
]
EOF
)"
log "patching the GPU settings into ksvc/$SERVICE_NAME"
run kubectl patch ksvc "$SERVICE_NAME" -n "$NAMESPACE" --type=json -p "$patch"

# ---- 4. wait, then drop func's GPU-less revision (only if it is not serving and really has no GPU)
wait_ksvc_ready "$SERVICE_NAME" "$NAMESPACE" "$WAIT_TIMEOUT"
if [[ "$DRY_RUN" == 1 ]]; then
  printf '# then: kubectl delete revision <the revision func deploy created> -n %s, if it has no %s limit\n' \
    "$NAMESPACE" nvidia.com/gpu
elif [[ -n "$interim" ]]; then
  ready_rev="$(kubectl get ksvc "$SERVICE_NAME" -n "$NAMESPACE" -o 'jsonpath={.status.latestReadyRevisionName}')"
  gpu="$(kubectl get revision "$interim" -n "$NAMESPACE" \
    -o 'jsonpath={.spec.containers[0].resources.limits.nvidia\.com/gpu}' 2>/dev/null || true)"
  if [[ "$interim" != "$ready_rev" && -z "$gpu" ]]; then
    log "deleting revision $interim (created by func deploy without a GPU; never served)"
    run kubectl delete revision "$interim" -n "$NAMESPACE" --ignore-not-found
  fi
fi
print_usage_hint "$SERVICE_NAME" "$NAMESPACE"
