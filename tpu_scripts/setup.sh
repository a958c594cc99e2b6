#!/usr/bin/env bash
# Copy the repository to every worker of a TPU VM and install jresid there.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$script_dir/common.sh"

SCRIPT_SUMMARY="Copy this repository to every worker of a TPU VM and install jresid there,
pinned by requirements/constraints.txt, with the TPU runtime (libtpu)."
SCRIPT_DESCRIPTION="Steps:
  1. Pack the repository into a .tar.gz on this machine: the working tree
     (tracked files and untracked files that git does not ignore), or the
     commit named by --ref.
  2. gcloud compute tpus tpu-vm scp ... --worker=all copies it to each worker.
  3. gcloud compute tpus tpu-vm ssh ... --worker=all unpacks it into ~/$REMOTE_REPO_DIR
     (replacing everything there except ~/$REMOTE_REPO_DIR/.venv) and runs
       python3 -m venv ~/$REMOTE_REPO_DIR/.venv
       pip install -c requirements/constraints.txt -e .
       pip install -c requirements/constraints.txt 'jax[tpu]==<jax version in the constraints>'
  4. Unless --skip-check, every worker runs jax.distributed.initialize() and
     prints its process index and device counts.
Keep run outputs outside ~/$REMOTE_REPO_DIR: a later setup.sh replaces it."

add_vm_options
add_option --repo REPO JRESID_TPU_REPO "" DIR \
    "Local jresid repository to copy." \
    "the repository that contains this script"
add_option --ref REF JRESID_TPU_REF "" REF \
    "Copy this git commit, branch or tag (git archive) instead of the working tree." \
    "the working tree, uncommitted changes included"
add_option --python PYTHON JRESID_TPU_PYTHON python3 COMMAND \
    "Python interpreter on the workers that creates the virtual environment; jresid needs 3.11 or newer."
add_switch --skip-check SKIP_CHECK JRESID_TPU_SKIP_CHECK \
    "Skip the final check that JAX sees the TPU devices on every worker."
add_internal_ip_option
add_dry_run_option

parse_args "$@"
require_settings PROJECT ZONE NAME
if [ -z "$REPO" ]; then
    REPO=$(cd "$script_dir/.." && pwd)
fi
repo_root=$(git -C "$REPO" rev-parse --show-toplevel 2>/dev/null) ||
    die_usage "--repo '$REPO' is not inside a git repository"
if [ -n "$REF" ]; then
    git -C "$repo_root" rev-parse --verify --quiet "$REF^{commit}" >/dev/null ||
        die_usage "--ref '$REF' is not a commit in $repo_root"
    constraints=$(git -C "$repo_root" show "$REF:requirements/constraints.txt" 2>/dev/null) ||
        die "requirements/constraints.txt not found at $REF in $repo_root"
else
    [ -f "$repo_root/requirements/constraints.txt" ] ||
        die "$repo_root/requirements/constraints.txt not found; it pins the versions installed on the workers"
    constraints=$(cat "$repo_root/requirements/constraints.txt")
fi
jax_version=$(printf '%s\n' "$constraints" | sed -n 's/^jax==\([^ ;#]*\).*/\1/p' | head -n 1)
[ -n "$jax_version" ] ||
    die "requirements/constraints.txt has no 'jax==VERSION' line; regenerate it with 'make lock'"
require_gcloud
resolve_project

remote_archive=jresid-src.tar.gz

# Step 1: pack the repository.
if [ "$DRY_RUN" = 1 ]; then
    archive="${TMPDIR:-/tmp}/jresid-setup.XXXXXX/$remote_archive"
    if [ -n "$REF" ]; then
        printf '# pack %s at %s into %s\n' "$repo_root" "$REF" "$archive"
    else
        printf '# pack the working tree of %s into %s\n' "$repo_root" "$archive"
    fi
else
    work_dir=$(mktemp -d "${TMPDIR:-/tmp}/jresid-setup.XXXXXX")
    trap 'rm -rf "$work_dir"' EXIT
    archive="$work_dir/$remote_archive"
    if [ -n "$REF" ]; then
        git -C "$repo_root" archive --format=tar.gz -o "$archive" "$REF"
    else
        # ls-files still lists tracked files deleted in the working tree, so
        # keep only paths that exist.
        file_list="$work_dir/files"
        : >"$file_list"
        while IFS= read -r -d '' path; do
            if [ -e "$repo_root/$path" ] || [ -L "$repo_root/$path" ]; then
                printf '%s\0' "$path" >>"$file_list"
            fi
        done < <(git -C "$repo_root" ls-files -z --cached --others --exclude-standard)
        tar -C "$repo_root" --null -T "$file_list" -czf "$archive"
    fi
    info "packed $(wc -c <"$archive" | tr -d ' ') bytes into $archive"
fi

# Step 2: copy the archive to the home directory of every worker.
scp_flags=(--worker=all)
if [ "$INTERNAL_IP" = 1 ]; then
    scp_flags+=(--internal-ip)
fi
gcloud_tpu_vm scp "$archive" "$NAME:$remote_archive" "${scp_flags[@]}"

# Step 3: unpack and install. The remote commands are POSIX sh on one line,
# so that --dry-run prints each gcloud command on one line.
#
# requirements/constraints.txt is frozen on a CPU machine. It pins jax and
# jaxlib, which on their own run on the CPU only, and has no libtpu. The
# 'tpu' extra of the same jax version keeps that jaxlib and adds libtpu, the
# TPU runtime that jax loads as a plugin: jax 0.10.2 requires jaxlib 0.10.2
# and libtpu 0.0.42.*. Installing it with the same -c file keeps every other
# package at its locked version, and pip fails if the extra disagrees with
# the lock.
py=$(shell_quote "$PYTHON")
repo_dir="\"\$HOME\"/$REMOTE_REPO_DIR"
python_hint="install Python 3.11 or newer (for example: sudo apt-get install -y python3.11 python3.11-venv) and rerun setup.sh with --python python3.11"
version_check="import sys; sys.exit(sys.version_info < (3, 11))"
version_print="import sys; print(sys.version_info[:2])"
install_steps=(
    "set -eu"
    "py=$py"
    "if ! command -v \"\$py\" >/dev/null 2>&1; then echo \"\$(hostname): \$py not found; $python_hint\" >&2; exit 1; fi"
    "if ! \"\$py\" -c '$version_check'; then echo \"\$(hostname): \$py is \$(\"\$py\" -V 2>&1), but jresid needs Python 3.11 or newer; $python_hint\" >&2; exit 1; fi"
    "mkdir -p $repo_dir"
    "find $repo_dir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +"
    "tar -xzf \"\$HOME\"/$remote_archive -C $repo_dir"
    "rm -f \"\$HOME\"/$remote_archive"
    "cd $repo_dir"
    "if [ -x .venv/bin/python ] && [ \"\$(.venv/bin/python -c '$version_print')\" != \"\$(\"\$py\" -c '$version_print')\" ]; then rm -rf .venv; fi"
    "if [ ! -x .venv/bin/python ]; then \"\$py\" -m venv .venv || { rm -rf .venv; echo \"\$(hostname): \$py -m venv failed; install the venv module (for example: sudo apt-get install -y python3.11-venv)\" >&2; exit 1; }; fi"
    ".venv/bin/python -m pip install --quiet --upgrade pip"
    ".venv/bin/python -m pip install --quiet -c requirements/constraints.txt -e ."
    ".venv/bin/python -m pip install --quiet -c requirements/constraints.txt $(shell_quote "jax[tpu]==$jax_version")"
    "echo \"\$(hostname): jresid installed in \$HOME/$REMOTE_REPO_DIR/.venv\""
)
install_command=""
for step in "${install_steps[@]}"; do
    install_command="$install_command${install_command:+; }$step"
done
ssh_all_workers "$install_command"

# Step 4: jax.distributed.initialize() returns only once every worker has
# joined, so the check must run on all workers at once (--worker=all).
if [ "$SKIP_CHECK" != 1 ]; then
    check_code='import jax; jax.distributed.initialize(); print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, {jax.device_count()} in total, platform {jax.default_backend()}")'
    ssh_all_workers "cd $repo_dir && .venv/bin/python -c $(shell_quote "$check_code")"
fi
