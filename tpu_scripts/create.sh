#!/usr/bin/env bash
# Create a Cloud TPU VM: a single host (v4-8, v5litepod-8) or a pod slice.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Create a Cloud TPU VM, a single host or a multi-host pod slice, with
'gcloud compute tpus tpu-vm create'."
SCRIPT_DESCRIPTION="Examples:
  $SCRIPT_NAME --project my-project --zone us-central2-b --name jresid-v4 \\
      --accelerator-type v4-32 --version tpu-ubuntu2204-base
  $SCRIPT_NAME --project my-project --zone us-west4-a --name jresid-v5e \\
      --accelerator-type v5litepod-16 --version v2-alpha-tpuv5-lite --spot
List the runtime versions a zone offers with
'gcloud compute tpus versions list --zone ZONE'."
EXTRA_ARGS_HELP="Further flags for 'gcloud compute tpus tpu-vm create', for example --network=NETWORK or --metadata=KEY=VALUE."

add_vm_options
add_option --accelerator-type ACCELERATOR_TYPE JRESID_TPU_TYPE "" TYPE \
    "TPU accelerator type, for example v4-32 (16 chips) or v5litepod-16 (16 chips)."
add_option --version RUNTIME_VERSION JRESID_TPU_VERSION "" VERSION \
    "TPU software (runtime) version, for example tpu-ubuntu2204-base for v4 or v2-alpha-tpuv5-lite for v5e."
add_switch --spot SPOT JRESID_TPU_SPOT \
    "Create a Spot VM: lower price, and Google Cloud may reclaim it at any time."
add_switch --preemptible PREEMPTIBLE JRESID_TPU_PREEMPTIBLE \
    "Create a preemptible VM (the older form of --spot). Cannot be combined with --spot."
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME ACCELERATOR_TYPE RUNTIME_VERSION
if [ "$SPOT" = 1 ] && [ "$PREEMPTIBLE" = 1 ]; then
    die_usage "--spot and --preemptible cannot be used together. Choose one."
fi
require_gcloud
resolve_project

create_flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [ "$SPOT" = 1 ]; then
    create_flags+=(--spot)
fi
if [ "$PREEMPTIBLE" = 1 ]; then
    create_flags+=(--preemptible)
fi

gcloud_tpu_vm create "$NAME" "${create_flags[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
