#!/usr/bin/env bash
# Copy a sweep's output folder, and each worker's log, back from a TPU VM.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Copy the output folder of a sweep started by launch.sh back to this
machine with 'gcloud compute tpus tpu-vm scp --recurse', then each worker's log."
SCRIPT_DESCRIPTION="The sweep gathers its results and writes OUT once, on the worker given by
--worker (process 0, worker 0, unless the slice numbers them otherwise).
OUT lands in DEST/<last part of OUT>, and the logs in DEST/logs/.
gcloud copies from one worker per command, so the logs take one scp per
worker; the worker count comes from --workers or, when that is unset,
from 'gcloud compute tpus tpu-vm describe' (the length of networkEndpoints)."

add_vm_options
add_option --run RUN JRESID_TPU_RUN "" RUN \
    "Run id given to launch.sh."
# shellcheck disable=SC2088 # "~" is a path on the worker, expanded there
add_option --out OUT JRESID_TPU_OUT "" PATH \
    "Output folder on the worker, as given to launch.sh --out." \
    "~/$REMOTE_RUNS_DIR/RUN/out"
add_option --dest DEST JRESID_TPU_DEST "" DIR \
    "Local folder to copy into; created when missing." \
    "runs/RUN in the current directory"
add_option --worker FETCH_WORKER JRESID_TPU_FETCH_WORKER 0 N \
    "Worker that holds OUT."
add_option --workers WORKER_COUNT JRESID_TPU_WORKERS "" N \
    "Number of workers in the slice, for copying the logs." \
    "read from gcloud compute tpus tpu-vm describe; --dry-run never reads it, so without --workers it prints only the describe command"
add_switch --skip-logs SKIP_LOGS JRESID_TPU_SKIP_LOGS \
    "Copy only OUT, not the per-worker logs."
add_internal_ip_option
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME RUN
require_run_id --run
case $FETCH_WORKER in
    '' | *[!0-9]*) die_usage "invalid --worker '$FETCH_WORKER': expected a worker number such as 0" ;;
esac
if [ -n "$WORKER_COUNT" ]; then
    require_positive_integer WORKER_COUNT --workers
fi
if [ -z "$OUT" ]; then
    # shellcheck disable=SC2088 # "~" is a path on the worker, expanded there
    OUT="~/$REMOTE_RUNS_DIR/$RUN/out"
fi
if [ -z "$DEST" ]; then
    DEST="runs/$RUN"
fi
require_gcloud
resolve_project

scp_flags=()
if [ "$INTERNAL_IP" = 1 ]; then
    scp_flags+=(--internal-ip)
fi

run mkdir -p "$DEST"
gcloud_tpu_vm scp --recurse "$NAME:$(scp_remote_path "$OUT")" "$DEST" \
    --worker="$FETCH_WORKER" ${scp_flags[@]+"${scp_flags[@]}"}

if [ "$SKIP_LOGS" = 1 ]; then
    exit 0
fi

describe_command=(gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT" --zone="$ZONE"
    --format='value(networkEndpoints.len())')
if [ -z "$WORKER_COUNT" ]; then
    if [ "$DRY_RUN" = 1 ]; then
        print_command "${describe_command[@]}"
        info "pass --workers N to see the scp command for each worker's log"
        exit 0
    fi
    # NOTE: a TPU VM with more than one network lists several endpoints per
    # worker, which makes this count too high. Pass --workers for such VMs.
    WORKER_COUNT=$(run "${describe_command[@]}")
    require_positive_integer WORKER_COUNT "worker count from gcloud"
fi

run mkdir -p "$DEST/logs"
worker=0
while [ "$worker" -lt "$WORKER_COUNT" ]; do
    gcloud_tpu_vm scp "$NAME:$REMOTE_RUNS_DIR/$RUN/host-*.log" "$DEST/logs/" \
        --worker="$worker" ${scp_flags[@]+"${scp_flags[@]}"}
    worker=$((worker + 1))
done
