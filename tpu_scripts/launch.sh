#!/usr/bin/env bash
# Start a jresid sweep on every worker of a TPU VM, in the background.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Start 'jresid sweep' on every worker of a TPU VM at once, detached with
nohup, so that it keeps running after this script and the SSH sessions end."
SCRIPT_DESCRIPTION="Each worker runs, from ~/$REMOTE_REPO_DIR (the copy made by setup.sh):
  ~/$REMOTE_REPO_DIR/.venv/bin/jresid sweep PROMPTS --out OUT --model MODEL \\
      --batch-size N --mesh data=D,model=M --distributed [ARGS...]
and writes its output to ~/$REMOTE_RUNS_DIR/RUN/host-WORKER.log, its process id
to host-WORKER.pid and, once the sweep ends, its exit status to host-WORKER.exit.
WORKER is TPU_WORKER_ID when set, else the worker number from the VM's
metadata (agent-worker-number), else the host name. With --distributed,
jax.distributed.initialize() runs with no arguments and reads the slice
layout from the TPU metadata. The sweep gathers the results and writes OUT
once. PROMPTS, OUT and a MODEL folder are paths on the workers: '~/...' is
the remote home directory, and a relative path is relative to ~/$REMOTE_REPO_DIR,
which setup.sh replaces, so keep OUT outside it.
Follow the run with status.sh, end it with stop.sh, copy OUT back with fetch.sh."
EXTRA_ARGS_HELP="Further arguments for 'jresid sweep', appended after --distributed."

add_vm_options
add_option --prompts PROMPTS JRESID_TPU_PROMPTS "" PATH \
    "Prompts file (JSON Lines) on the workers, for example ~/prompts.jsonl."
# shellcheck disable=SC2088 # "~" is a path on the worker, expanded there
add_option --out OUT JRESID_TPU_OUT "" PATH \
    "Output folder on the workers, written once by the sweep." \
    "~/$REMOTE_RUNS_DIR/RUN/out"
add_option --model MODEL JRESID_TPU_MODEL "" MODEL \
    "Model for 'jresid sweep --model': a checkpoint folder on every worker, or a Hugging Face model id."
add_option --batch-size BATCH_SIZE JRESID_TPU_BATCH_SIZE "" N \
    "Batch size, passed to 'jresid sweep --batch-size'."
add_option --mesh MESH JRESID_TPU_MESH "" data=D,model=M \
    "Device mesh: D data-parallel replicas times M model shards; D x M must equal the slice's device count, and M must divide the model's query heads (40 for QwQ-32B)."
add_option --run RUN JRESID_TPU_RUN "" RUN \
    "Run id: names ~/$REMOTE_RUNS_DIR/RUN on each worker. Letters, digits, '.', '_' and '-'." \
    "the UTC start time, YYYYMMDD-HHMMSS"
add_internal_ip_option
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME PROMPTS MODEL BATCH_SIZE MESH
require_positive_integer BATCH_SIZE --batch-size
case $MESH in
    data=*,model=*)
        mesh_data=${MESH#data=}
        mesh_data=${mesh_data%%,*}
        # shellcheck disable=SC2034 # read by require_positive_integer
        mesh_model=${MESH#*,model=}
        ;;
    *)
        die_usage "invalid --mesh '$MESH': expected data=D,model=M, for example data=2,model=4"
        ;;
esac
require_positive_integer mesh_data "--mesh data size"
require_positive_integer mesh_model "--mesh model size"
if [ -z "$RUN" ]; then
    RUN=$(date -u +%Y%m%d-%H%M%S)
fi
require_run_id --run
fetch_hint="fetch.sh --run $RUN"
if [ -z "$OUT" ]; then
    # shellcheck disable=SC2088 # "~" is a path on the worker, expanded there
    OUT="~/$REMOTE_RUNS_DIR/$RUN/out"
else
    fetch_hint="$fetch_hint --out $(shell_quote "$OUT")"
fi
require_gcloud
resolve_project

sweep_words=(
    "\"\$jresid\"" sweep "$(remote_shell_path "$PROMPTS")"
    --out "$(remote_shell_path "$OUT")"
    --model "$(remote_shell_path "$MODEL")"
    --batch-size "$BATCH_SIZE"
    --mesh "$MESH"
    --distributed
)
for word in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    sweep_words+=("$(shell_quote "$word")")
done
sweep_command="${sweep_words[*]}"

# One line of POSIX sh per worker. The braces around the background job let
# "; " follow it. setsid puts the sweep in its own process
# group, whose id is the recorded pid, so stop.sh can signal the whole group.
# The sh -c wrapper records the sweep's exit status in host-WORKER.exit.
metadata_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
launch_steps=(
    "set -eu"
    "$REMOTE_IS_ALIVE"
    "run_dir=\"\$HOME\"/$REMOTE_RUNS_DIR/$RUN"
    "jresid=\"\$HOME\"/$REMOTE_REPO_DIR/.venv/bin/jresid"
    "if [ ! -x \"\$jresid\" ]; then echo \"\$(hostname): \$jresid not found; run setup.sh first\" >&2; exit 1; fi"
    "worker=\${TPU_WORKER_ID:-}"
    "if [ -z \"\$worker\" ]; then worker=\$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' $metadata_url 2>/dev/null || true); fi"
    "if [ -z \"\$worker\" ]; then worker=\$(hostname); fi"
    "mkdir -p \"\$run_dir\""
    "host=\"\$run_dir/host-\$worker\""
    "if [ -f \"\$host.pid\" ] && is_alive \"\$(cat \"\$host.pid\")\"; then echo \"\$(hostname): run $RUN is already running as pid \$(cat \"\$host.pid\"); stop it with stop.sh --run $RUN or pass another --run\" >&2; exit 1; fi"
    "rm -f \"\$host.exit\""
    "cd \"\$HOME\"/$REMOTE_REPO_DIR"
    "echo \"started \$(date -u +%Y-%m-%dT%H:%M:%SZ) on \$(hostname), worker \$worker, run $RUN\" >\"\$host.log\""
    "{ setsid nohup sh -c '\"\$@\"; echo \"\$?\" >\"\$0\"' \"\$host.exit\" $sweep_command >>\"\$host.log\" 2>&1 </dev/null & }"
    "echo \"\$!\" >\"\$host.pid\""
    "echo \"\$(hostname): worker \$worker started run $RUN as pid \$!; log \$host.log\""
)
launch_command=""
for step in "${launch_steps[@]}"; do
    launch_command="$launch_command${launch_command:+; }$step"
done

ssh_all_workers "$launch_command"

info "run $RUN: follow it with status.sh --run $RUN, end it with stop.sh --run $RUN, copy the output back with $fetch_hint"
