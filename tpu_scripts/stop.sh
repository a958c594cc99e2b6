#!/usr/bin/env bash
# Stop the sweep processes that launch.sh started on every worker.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Stop the sweeps that launch.sh started on every worker of a TPU VM."
SCRIPT_DESCRIPTION="On each worker, every ~/$REMOTE_RUNS_DIR/RUN/host-*.pid whose process is alive
and is a 'jresid sweep' gets SIGTERM (SIGKILL with --force), sent to its
whole process group. Other processes are never signalled. The logs stay in
place for status.sh and fetch.sh."

add_vm_options
add_option --run RUN JRESID_TPU_RUN "" RUN \
    "Run id given to launch.sh." \
    "every run under ~/$REMOTE_RUNS_DIR"
add_switch --force FORCE "" \
    "Send SIGKILL instead of SIGTERM, for a sweep that ignores SIGTERM."
add_internal_ip_option
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME
if [ -n "$RUN" ]; then
    require_run_id --run
    pid_glob="\"\$base\"/$RUN/host-*.pid"
else
    pid_glob="\"\$base\"/*/host-*.pid"
fi
signal=TERM
if [ "$FORCE" = 1 ]; then
    signal=KILL
fi
require_gcloud
resolve_project

# launch.sh starts each sweep with setsid, so its pid is also its process
# group id and "kill -- -PID" reaches the sweep and its children. The ps check
# guards against a pid that the system has since given to another program.
stop_steps=(
    "set -eu"
    "$REMOTE_IS_ALIVE"
    "base=\"\$HOME\"/$REMOTE_RUNS_DIR"
    "stopped=0"
    "for pid_file in $pid_glob; do if [ ! -f \"\$pid_file\" ]; then continue; fi; pid=\$(cat \"\$pid_file\"); if ! is_alive \"\$pid\"; then continue; fi; case \$(ps -o args= -p \"\$pid\" 2>/dev/null) in *'jresid sweep'*) ;; *) echo \"\$(hostname): pid \$pid in \$pid_file is no longer a jresid sweep; not signalled\" >&2; continue ;; esac; kill -s $signal -- \"-\$pid\"; stopped=\$((stopped + 1)); echo \"\$(hostname): sent SIG$signal to sweep process group \$pid (\$pid_file)\"; done"
    "if [ \"\$stopped\" = 0 ]; then echo \"\$(hostname): no running sweep found\"; fi"
)
stop_command=""
for step in "${stop_steps[@]}"; do
    stop_command="$stop_command${stop_command:+; }$step"
done

ssh_all_workers "$stop_command"
