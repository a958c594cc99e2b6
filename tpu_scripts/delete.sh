#!/usr/bin/env bash
# Delete a Cloud TPU VM after asking for confirmation.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Delete a Cloud TPU VM with 'gcloud compute tpus tpu-vm delete'.
Everything on its workers is lost: fetch results with fetch.sh first."
SCRIPT_DESCRIPTION="Without --yes the script asks on the terminal (or reads a line from
standard input) and deletes only after the answer y or yes."

add_vm_options
add_switch --yes ASSUME_YES "" \
    "Delete without asking for confirmation."
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME
require_gcloud
resolve_project

if [ "$DRY_RUN" != 1 ] && [ "$ASSUME_YES" != 1 ]; then
    answer=""
    printf 'Delete TPU VM %s in zone %s of project %s? [y/N] ' "$NAME" "$ZONE" "$PROJECT" >&2
    read -r answer || true
    case $answer in
        y | Y | yes | YES | Yes) ;;
        *) die "deletion not confirmed; nothing was deleted. Pass --yes to skip the question." ;;
    esac
fi

# --quiet stops gcloud from asking a second time.
gcloud_tpu_vm delete "$NAME" --quiet
