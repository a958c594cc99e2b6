#!/usr/bin/env bash
# Show the state and the last log lines of a sweep on every worker.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Show, for every worker of a TPU VM, whether the sweep started by launch.sh
is running or how it ended, followed by the last lines of its log."
SCRIPT_DESCRIPTION="Each output line starts with [host-WORKER], the name of the log under
~/$REMOTE_RUNS_DIR/RUN/, because the workers' output arrives interleaved."

add_vm_options
add_option --run RUN JRESID_TPU_RUN "" RUN \
    "Run id given to launch.sh." \
    "the most recently created run on each worker"
add_option --lines LOG_LINES JRESID_TPU_LINES 20 N \
    "Number of log lines to show per worker."
add_internal_ip_option
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME
require_positive_integer LOG_LINES --lines
if [ -n "$RUN" ]; then
    require_run_id --run
fi
require_gcloud
resolve_project

if [ -n "$RUN" ]; then
    pick_run="run=$RUN"
else
    # The newest folder under ~/jresid-runs; -nt works in bash and dash.
    pick_run="run=; latest=; for dir in \"\$base\"/*/; do if [ -d \"\$dir\" ] && { [ -z \"\$latest\" ] || [ \"\$dir\" -nt \"\$latest\" ]; }; then latest=\$dir; fi; done; if [ -n \"\$latest\" ]; then latest=\${latest%/}; run=\${latest##*/}; fi"
fi

status_steps=(
    "set -eu"
    "$REMOTE_IS_ALIVE"
    "base=\"\$HOME\"/$REMOTE_RUNS_DIR"
    "$pick_run"
    "if [ -z \"\$run\" ] || [ ! -d \"\$base/\$run\" ]; then echo \"\$(hostname): no run \${run:-at all} under \$base\" >&2; exit 1; fi"
    "found=0"
    "for pid_file in \"\$base/\$run\"/host-*.pid; do if [ ! -f \"\$pid_file\" ]; then continue; fi; found=1; host=\${pid_file%.pid}; label=\${host##*/}; pid=\$(cat \"\$pid_file\"); if is_alive \"\$pid\"; then state=\"running as pid \$pid\"; elif [ -f \"\$host.exit\" ]; then state=\"exited with status \$(cat \"\$host.exit\")\"; else state=\"not running and no exit status: stopped, killed, or the worker restarted\"; fi; echo \"[\$label] \$(hostname) run \$run: \$state\"; if [ -f \"\$host.log\" ]; then tail -n $LOG_LINES \"\$host.log\" | sed \"s/^/[\$label] /\"; fi; done"
    "if [ \"\$found\" = 0 ]; then echo \"\$(hostname): run \$run has no host-*.pid file under \$base/\$run\" >&2; exit 1; fi"
)
status_command=""
for step in "${status_steps[@]}"; do
    status_command="$status_command${status_command:+; }$step"
done

ssh_all_workers "$status_command"
