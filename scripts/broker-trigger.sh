#!/usr/bin/env bash
# Wire the model service to a Knative Eventing Broker: Broker + Trigger + dead-letter sink (k8s/eventing.yaml).
set -euo pipefail

# shellcheck source=scripts/deploy-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-lib.sh"

REQUEST_TYPE="com.autoglm.chat.completion.request"

usage() {
  cat <<EOF
Usage: scripts/broker-trigger.sh [options]

Applies k8s/eventing.yaml: Broker '$BROKER_NAME', Trigger '$TRIGGER_NAME' (type=$REQUEST_TYPE ->
ksvc/$SERVICE_NAME, 6 retries with exponential backoff, 10 min per attempt, dead letters to ksvc/autoglm-dead-letter),
waits until they are Ready and prints how to send a request event. Needs Knative Eventing and the model service
(scripts/deploy.sh) in the same namespace.

The func CLI equivalent of the Trigger (without the delivery options, which func subscriptions cannot set):
  func subscribe --source $BROKER_NAME --filter type=$REQUEST_TYPE && func deploy

Options:
  -n, --namespace NS     namespace (default: the kubeconfig context's, else "default")
  --timeout SECONDS      how long to wait for Ready (default: 300)
  --dry-run              print the commands instead of running them
  -h, --help             show this help
EOF
}

NAMESPACE=""
TIMEOUT=300
while (($#)); do
  case "$1" in
    -n | --namespace) NAMESPACE="${2:?--namespace needs a value}"; shift ;;
    --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"

need kubectl "applies the Broker and Trigger"
NAMESPACE="${NAMESPACE:-$(current_namespace)}"

if [[ "$DRY_RUN" != 1 ]]; then
  kubectl get crd brokers.eventing.knative.dev triggers.eventing.knative.dev >/dev/null \
    || die "Knative Eventing is not installed (no Broker/Trigger CRDs)"
  timeout_flag="$(kubectl get configmap config-features -n knative-eventing \
    -o 'jsonpath={.data.delivery-timeout}' 2>/dev/null || true)"
  if [[ -n "$timeout_flag" && "$(lower "$timeout_flag")" != enabled ]]; then
    die "knative-eventing config-features delivery-timeout is '$timeout_flag'; the Trigger sets delivery.timeout. Run scripts/enable-knative-features.sh"
  fi
fi

apply_manifest "$REPO_ROOT/k8s/eventing.yaml" "$NAMESPACE"
run kubectl wait --for=condition=Ready -n "$NAMESPACE" --timeout="${TIMEOUT}s" \
  "broker/$BROKER_NAME" "trigger/$TRIGGER_NAME"

if [[ "$DRY_RUN" == 1 ]]; then
  print_cmd kubectl get broker "$BROKER_NAME" -n "$NAMESPACE" -o 'jsonpath={.status.address.url}'
  broker_url="http://broker-ingress.knative-eventing.svc.cluster.local/$NAMESPACE/$BROKER_NAME"
else
  broker_url="$(kubectl get broker "$BROKER_NAME" -n "$NAMESPACE" -o 'jsonpath={.status.address.url}')"
fi

cat <<EOF

Broker URL (cluster-internal): $broker_url

Send a chat request as a binary-mode CloudEvent from inside the cluster:
  kubectl run ce-client -n $NAMESPACE --rm -i --restart=Never --image=curlimages/curl -- \\
    curl -sS -X POST "$broker_url" \\
      -H 'Ce-Specversion: 1.0' -H 'Ce-Type: $REQUEST_TYPE' \\
      -H 'Ce-Source: /example/client' -H "Ce-Id: \$(date +%s%N)" \\
      -H 'Content-Type: application/json' \\
      -d '{"model": "$SERVED_MODEL_NAME", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

The broker answers 202 at once; the reply event (type com.autoglm.chat.completion.response) is published back into
broker '$BROKER_NAME' for consumers with their own Trigger. Failed deliveries are logged by:
  kubectl logs -n $NAMESPACE -l serving.knative.dev/service=autoglm-dead-letter -c event-display
EOF
