#!/usr/bin/env bash
# Deploy AutoGLM-Phone-9B as a Knative Service (service.yaml) with kubectl or kn, wait until it is ready, print a curl.
set -euo pipefail

# shellcheck source=scripts/deploy-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"

PREPULL_NAME="autoglm-prepull"             # k8s/prepull.yaml

usage() {
  cat <<EOF
Usage: scripts/deploy.sh [options]

Checks the prerequisites (kubectl/kn, Knative Serving CRDs, the feature flags, GPU nodes), renders service.yaml with
your image, namespace and GPU product, applies it (the model cache PVC and the Knative Service $SERVICE_NAME)
together with the image pre-pull DaemonSet (k8s/prepull.yaml, rendered the same way, so the GPU nodes hold the image
before a cold start needs it), waits until the newest revision is ready, and prints the URL and a curl that works.

  kubectl method (default):  kubectl apply -n NS -f service.yaml
  kn method:                 kubectl apply the PVC, then
                             kn service create $SERVICE_NAME -n NS --filename <the Knative Service document> --force
  The long kn form without a file is in docs/deploy.md (it cannot set a startupProbe; the file can).

Options:
  --method kubectl|kn    how to create the Service (default: kubectl)
  -n, --namespace NS     namespace (default: the kubeconfig context's, else "default")
  --image IMAGE          image built from the Dockerfile (default: $DEFAULT_IMAGE)
  --gpu-product LABEL    nvidia.com/gpu.product of the GPU nodes to use (default: $DEFAULT_GPU_PRODUCT)
  --no-prepull           do not apply the image pre-pull DaemonSet $PREPULL_NAME (k8s/prepull.yaml)
  --with-prequantize     first run the Job that fills the model cache (scripts/prequantize-job.sh); needed once
  --with-eventing        also apply the Broker/Trigger wiring (scripts/broker-trigger.sh)
  --with-cache-front     also apply the CPU cache-front Service and Redis (k8s/cache-front.yaml)
  --with-schedule        also apply the scheduled min-scale CronJobs and their RBAC (k8s/schedule.yaml; edit its
                         times and zone first)
  --enable-features      enable the needed Knative feature flags (scripts/enable-knative-features.sh; cluster admin)
  --wait-timeout SECONDS how long to wait for readiness (default: 1800, the revision's progress-deadline)
  --dry-run              print the commands instead of running them (SHOW_MANIFESTS=1: and the rendered
                         manifests, each line prefixed with "| ")
  -h, --help             show this help
EOF
}

METHOD=kubectl
NAMESPACE=""
IMAGE="$DEFAULT_IMAGE"
GPU_PRODUCT="$DEFAULT_GPU_PRODUCT"
PREPULL=1
WITH_PREQUANTIZE=0
WITH_EVENTING=0
WITH_CACHE_FRONT=0
WITH_SCHEDULE=0
ENABLE_FEATURES=0
WAIT_TIMEOUT=1800
while (($#)); do
  case "$1" in
    --method) METHOD="${2:?--method needs kubectl or kn}"; shift ;;
    -n | --namespace) NAMESPACE="${2:?--namespace needs a value}"; shift ;;
    --image) IMAGE="${2:?--image needs a value}"; shift ;;
    --gpu-product) GPU_PRODUCT="${2:?--gpu-product needs a value}"; shift ;;
    --no-prepull) PREPULL=0 ;;
    --with-prequantize) WITH_PREQUANTIZE=1 ;;
    --with-eventing) WITH_EVENTING=1 ;;
    --with-cache-front) WITH_CACHE_FRONT=1 ;;
    --with-schedule) WITH_SCHEDULE=1 ;;
    --enable-features) ENABLE_FEATURES=1 ;;
    --wait-timeout) WAIT_TIMEOUT="${2:?--wait-timeout needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ "$METHOD" == kubectl || "$METHOD" == kn ]] || die "--method must be kubectl or kn"
[[ "$WAIT_TIMEOUT" =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds"
export DRY_RUN

# ---- prerequisites
need kubectl "applies the manifests and waits for readiness"
[[ "$METHOD" == kn ]] && need kn "the kn method creates the Service with kn (>= 1.15 for node selector/toleration flags)"
NAMESPACE="${NAMESPACE:-$(current_namespace)}"
log "deploying $SERVICE_NAME to namespace $NAMESPACE with $METHOD (image $IMAGE, GPU $GPU_PRODUCT)"

if [[ "$DRY_RUN" != 1 ]]; then
  kubectl version >/dev/null || die "cannot reach the cluster with kubectl"
  kubectl get crd services.serving.knative.dev >/dev/null 2>&1 \
    || die "Knative Serving is not installed (no services.serving.knative.dev CRD)"
  if [[ -z "$(kubectl get nodes -l "nvidia.com/gpu.product=$GPU_PRODUCT" -o name 2>/dev/null)" ]]; then
    warn "no node is labelled nvidia.com/gpu.product=$GPU_PRODUCT (yet): pods stay Pending unless a cluster" \
      "autoscaler adds one. Labels in use: $(kubectl get nodes -o 'jsonpath={.items[*].metadata.labels.nvidia\.com/gpu\.product}' 2>/dev/null)"
  fi
fi
# The helper scripts inherit DRY_RUN, so in a dry run they print their commands too.
if ((ENABLE_FEATURES)); then
  feature_args=()
  ((WITH_EVENTING)) || feature_args+=(--no-eventing)
  "$REPO_ROOT/scripts/enable-knative-features.sh" ${feature_args[@]+"${feature_args[@]}"}
fi
check_serving_features || die "enable the Knative feature flags first (or pass --enable-features)"

# ---- the image on the GPU nodes: first, so that the pulls run while the Job and the first revision start
if ((PREPULL)); then
  prepull="$(render "$REPO_ROOT/k8s/prepull.yaml" "$IMAGE" "$NAMESPACE" "$GPU_PRODUCT" | tmp_file)"
  apply_manifest "$prepull" "$NAMESPACE"
  log "pre-pulling $IMAGE on the $GPU_PRODUCT nodes (kubectl rollout status -n $NAMESPACE daemonset/$PREPULL_NAME)"
fi

# ---- the model cache
if ((WITH_PREQUANTIZE)); then
  "$REPO_ROOT/scripts/prequantize-job.sh" -n "$NAMESPACE" --image "$IMAGE" --gpu-product "$GPU_PRODUCT"
fi

# ---- the model service
rendered="$(render "$REPO_ROOT/service.yaml" "$IMAGE" "$NAMESPACE" "$GPU_PRODUCT" | tmp_file)"
case "$METHOD" in
  kubectl)
    apply_manifest "$rendered" "$NAMESPACE"
    ;;
  kn)
    pvc="$(select_docs PersistentVolumeClaim <"$rendered" | tmp_file)"
    ksvc="$(select_docs Service serving.knative.dev/ <"$rendered" | tmp_file)"
    apply_manifest "$pvc" "$NAMESPACE"
    run kn service create "$SERVICE_NAME" -n "$NAMESPACE" --filename "$ksvc" --force --no-wait
    show_manifest "$ksvc"
    ;;
esac
wait_ksvc_ready "$SERVICE_NAME" "$NAMESPACE" "$WAIT_TIMEOUT"

# ---- optional parts
if ((WITH_CACHE_FRONT)); then
  front="$(render "$REPO_ROOT/k8s/cache-front.yaml" "$IMAGE" "$NAMESPACE" "$GPU_PRODUCT" | tmp_file)"
  apply_manifest "$front" "$NAMESPACE"
  wait_ksvc_ready "$CACHE_FRONT_NAME" "$NAMESPACE" 900
fi
if ((WITH_EVENTING)); then
  "$REPO_ROOT/scripts/broker-trigger.sh" -n "$NAMESPACE"
fi
if ((WITH_SCHEDULE)); then
  apply_manifest "$REPO_ROOT/k8s/schedule.yaml" "$NAMESPACE"
fi

print_usage_hint "$SERVICE_NAME" "$NAMESPACE"
if ((WITH_CACHE_FRONT)); then
  log "clients that should use the response cache call ksvc/$CACHE_FRONT_NAME instead (same API)"
fi
