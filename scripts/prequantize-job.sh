#!/usr/bin/env bash
# Fill the model cache PVC: download AutoGLM-Phone-9B inside the cluster and pre-quantize it (k8s/prequantize-job.yaml).
set -euo pipefail

# shellcheck source=scripts/deploy-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"

usage() {
  cat <<EOF
Usage: scripts/prequantize-job.sh [options]

Creates the model cache PVC ($PVC_NAME, from service.yaml) if needed, (re)runs the Job $JOB_NAME
(k8s/prequantize-job.yaml: 'hf download zai-org/AutoGLM-Phone-9B' into the PVC, then 'python scripts/prequantize.py'
on a GPU node), waits for it to finish and prints its logs if it fails. Safe to re-run: the download resumes and
the finished Job is replaced.

Options:
  -n, --namespace NS     namespace (default: the kubeconfig context's, else "default")
  --image IMAGE          image to run (default: $DEFAULT_IMAGE)
  --gpu-product LABEL    value of the nvidia.com/gpu.product node label (default: $DEFAULT_GPU_PRODUCT)
  --timeout SECONDS      how long to wait for the Job (default: 7200, its activeDeadlineSeconds)
  --dry-run              print the commands instead of running them
  -h, --help             show this help
EOF
}

NAMESPACE=""
IMAGE="$DEFAULT_IMAGE"
GPU_PRODUCT="$DEFAULT_GPU_PRODUCT"
TIMEOUT=7200
while (($#)); do
  case "$1" in
    -n | --namespace) NAMESPACE="${2:?--namespace needs a value}"; shift ;;
    --image) IMAGE="${2:?--image needs a value}"; shift ;;
    --gpu-product) GPU_PRODUCT="${2:?--gpu-product needs a value}"; shift ;;
    --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"

need kubectl "applies the PVC and the Job"
NAMESPACE="${NAMESPACE:-$(current_namespace)}"

pvc="$(render "$REPO_ROOT/service.yaml" "$IMAGE" "$NAMESPACE" "$GPU_PRODUCT" | select_docs PersistentVolumeClaim | tmp_file)"
job="$(render "$REPO_ROOT/k8s/prequantize-job.yaml" "$IMAGE" "$NAMESPACE" "$GPU_PRODUCT" | tmp_file)"

log "model cache volume $PVC_NAME in namespace $NAMESPACE"
apply_manifest "$pvc" "$NAMESPACE"

log "replacing Job $JOB_NAME (a Job's pod template cannot be changed in place)"
run kubectl delete job "$JOB_NAME" -n "$NAMESPACE" --ignore-not-found --wait=true
apply_manifest "$job" "$NAMESPACE"

wait_job() {
  local deadline=$((SECONDS + TIMEOUT)) state
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd kubectl get job "$JOB_NAME" -n "$NAMESPACE" \
      -o 'jsonpath={.status.conditions[?(@.status=="True")].type}'
    printf '# (polled every 15 s until Complete or Failed, at most %s s)\n' "$TIMEOUT"
    return 0
  fi
  log "waiting up to ${TIMEOUT}s for Job $JOB_NAME (download ~20 GB, then the pre-quantized copy if QUANTIZATION asks for one)"
  while :; do
    state="$(kubectl get job "$JOB_NAME" -n "$NAMESPACE" \
      -o 'jsonpath={.status.conditions[?(@.status=="True")].type}' 2>/dev/null || true)"
    case " $state " in
      *" Complete "*) log "Job $JOB_NAME completed"; return 0 ;;
      *" Failed "*)
        warn "Job $JOB_NAME failed; its logs:"
        kubectl logs "job/$JOB_NAME" -n "$NAMESPACE" --all-containers --tail=100 >&2 || true
        return 1 ;;
    esac
    if ((SECONDS >= deadline)); then
      warn "timed out; see: kubectl describe job $JOB_NAME -n $NAMESPACE"
      return 1
    fi
    sleep 15
  done
}
wait_job

log "the model cache is filled; deploy the service with scripts/deploy.sh"
