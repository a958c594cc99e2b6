# shellcheck shell=bash
# Shared option parsing and command running for the scripts in tpu_scripts/.
# Source this file. Run on its own, it does nothing.
#
# Each script registers its options with add_option / add_switch, then calls
# parse_args "$@". A setting comes from its flag, else from its environment
# variable, else from its default. Bad or missing settings exit with status 2.
#
# Written for bash 3.2 or newer (the bash that macOS ships), so it avoids
# associative arrays and other bash 4 features.

SCRIPT_NAME=${0##*/}

# Paths on each TPU worker, relative to the remote user's home directory.
REMOTE_REPO_DIR=jresid
# shellcheck disable=SC2034 # used by the scripts that source this file
REMOTE_RUNS_DIR=jresid-runs

# Remote shell function: is PID a live process? kill -0 alone also accepts a
# zombie, which a container without an init process may never reap.
# shellcheck disable=SC2016,SC2034 # expanded by the remote shell; used by the scripts that source this file
REMOTE_IS_ALIVE='is_alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != Z ]; }'

# Option table: one entry per option, in the order shown by --help.
OPTION_FLAGS=()
OPTION_VARS=()
OPTION_ENVS=()
OPTION_DEFAULTS=()
OPTION_KINDS=()
OPTION_METAVARS=()
OPTION_HELPS=()
OPTION_DEFAULT_TEXTS=()

# Text for --help, set by each script before parse_args.
SCRIPT_SUMMARY=""
SCRIPT_DESCRIPTION=""
# Set to a description to accept arguments after "--" (stored in EXTRA_ARGS).
EXTRA_ARGS_HELP=""
EXTRA_ARGS=()

DRY_RUN=0

die_usage() {
    printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 2
}

die() {
    printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 1
}

info() {
    printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

# Register an option that takes a value.
# Usage: add_option FLAG VAR ENV DEFAULT METAVAR HELP [DEFAULT_TEXT]
# ENV may be empty. DEFAULT_TEXT replaces DEFAULT in --help when the real
# default is computed after parsing. Without DEFAULT_TEXT, an empty DEFAULT
# shows as "required".
add_option() {
    OPTION_FLAGS+=("$1")
    OPTION_VARS+=("$2")
    OPTION_ENVS+=("$3")
    OPTION_DEFAULTS+=("$4")
    OPTION_METAVARS+=("$5")
    OPTION_HELPS+=("$6")
    OPTION_DEFAULT_TEXTS+=("${7:-}")
    OPTION_KINDS+=(value)
}

# Register an on/off flag. Its variable is 1 or 0, and its environment
# variable accepts 1/true/yes/on and 0/false/no/off.
# Usage: add_switch FLAG VAR ENV HELP
add_switch() {
    OPTION_FLAGS+=("$1")
    OPTION_VARS+=("$2")
    OPTION_ENVS+=("$3")
    OPTION_DEFAULTS+=(0)
    OPTION_METAVARS+=("")
    OPTION_HELPS+=("$4")
    OPTION_DEFAULT_TEXTS+=("off")
    OPTION_KINDS+=(switch)
}

# The options every script shares: which TPU VM, and whether to only print.
add_vm_options() {
    add_option --project PROJECT JRESID_TPU_PROJECT "" PROJECT \
        "Google Cloud project that owns the TPU VM." \
        "gcloud's configured project (gcloud config get-value project); --dry-run never reads it, so pass it there"
    add_option --zone ZONE JRESID_TPU_ZONE "" ZONE \
        "Zone of the TPU VM, for example us-central2-b (v4) or us-west4-a (v5e)."
    add_option --name NAME JRESID_TPU_NAME "" NAME \
        "Name of the TPU VM (a single host or a pod slice)."
}

# Add --internal-ip, for scripts that reach the workers over SSH.
add_internal_ip_option() {
    add_switch --internal-ip INTERNAL_IP JRESID_TPU_INTERNAL_IP \
        "Connect to the workers by their internal IP addresses (gcloud's --internal-ip), for example from a VM in the same network."
}

add_dry_run_option() {
    add_switch --dry-run DRY_RUN JRESID_TPU_DRY_RUN \
        "Print the commands instead of running them. Needs neither gcloud nor a network."
}

usage() {
    local i flag metavar env default_text
    printf 'Usage: %s [options]' "$SCRIPT_NAME"
    if [ -n "$EXTRA_ARGS_HELP" ]; then
        printf ' [-- ARGS...]'
    fi
    printf '\n\n%s\n' "$SCRIPT_SUMMARY"
    if [ -n "$SCRIPT_DESCRIPTION" ]; then
        printf '\n%s\n' "$SCRIPT_DESCRIPTION"
    fi

    printf '\nOptions (a flag overrides its environment variable):\n'
    for i in "${!OPTION_FLAGS[@]}"; do
        flag=${OPTION_FLAGS[i]}
        metavar=${OPTION_METAVARS[i]}
        env=${OPTION_ENVS[i]}
        if [ -n "$metavar" ]; then
            printf '  %s %s\n' "$flag" "$metavar"
        else
            printf '  %s\n' "$flag"
        fi
        printf '      %s\n' "${OPTION_HELPS[i]}"
        if [ -n "$env" ]; then
            printf '      Environment variable: %s.\n' "$env"
        else
            printf '      Environment variable: none.\n'
        fi

        default_text=${OPTION_DEFAULT_TEXTS[i]}
        if [ -z "$default_text" ]; then
            if [ -n "${OPTION_DEFAULTS[i]}" ]; then
                default_text=${OPTION_DEFAULTS[i]}
            else
                default_text="none, required"
            fi
        fi
        printf '      Default: %s.\n' "$default_text"
    done

    printf '  -h, --help\n      Print this help and exit.\n'
    if [ -n "$EXTRA_ARGS_HELP" ]; then
        printf '  -- ARGS...\n      %s\n' "$EXTRA_ARGS_HELP"
    fi
    printf '\nExit status: 0 on success, 2 for a missing or invalid setting, 1 for any other failure.\n'
}

# Print WORD quoted for a POSIX shell, the way Python's shlex.quote does:
# unchanged when it holds only safe characters, else in single quotes.
shell_quote() {
    local word=$1
    local single_quote="'"
    local escaped_quote="'\"'\"'"
    if [ -z "$word" ]; then
        printf "''"
        return
    fi
    case $word in
        *[!A-Za-z0-9_@%+=:,./-]*)
            printf "'%s'" "${word//$single_quote/$escaped_quote}"
            ;;
        *)
            printf '%s' "$word"
            ;;
    esac
}

# Print a command as one line of shell-quoted words after "+ ".
print_command() {
    local word line="+"
    for word in "$@"; do
        line="$line $(shell_quote "$word")"
    done
    printf '%s\n' "$line"
}

# Run a command, or print it on stdout under --dry-run. In a real run the
# command is echoed on stderr first, so the output records what ran.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        print_command "$@"
        return 0
    fi
    print_command "$@" >&2
    "$@"
}

_option_index() {
    local i
    for i in "${!OPTION_FLAGS[@]}"; do
        if [ "${OPTION_FLAGS[i]}" = "$1" ]; then
            FOUND_OPTION_INDEX=$i
            return 0
        fi
    done
    return 1
}

_switch_value() {
    case $1 in
        1 | true | TRUE | True | yes | on) printf 1 ;;
        0 | false | FALSE | False | no | off | '') printf 0 ;;
        *) return 1 ;;
    esac
}

# Set every registered variable from its default, its environment variable,
# and then the command line.
parse_args() {
    local i env value flag has_value kind parsed

    for i in "${!OPTION_FLAGS[@]}"; do
        value=${OPTION_DEFAULTS[i]}
        env=${OPTION_ENVS[i]}
        if [ -n "$env" ] && [ -n "${!env:-}" ]; then
            value=${!env}
            if [ "${OPTION_KINDS[i]}" = switch ]; then
                parsed=$(_switch_value "$value") ||
                    die_usage "invalid value '$value' in $env: use 1 or 0"
                value=$parsed
            fi
        fi
        printf -v "${OPTION_VARS[i]}" '%s' "$value"
    done

    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help)
                usage
                exit 0
                ;;
            --)
                shift
                if [ -z "$EXTRA_ARGS_HELP" ] && [ $# -gt 0 ]; then
                    die_usage "unexpected arguments after --: $*. See $SCRIPT_NAME --help."
                fi
                # shellcheck disable=SC2034 # read by the scripts that source this file
                EXTRA_ARGS=("$@")
                break
                ;;
            --*=*)
                flag=${1%%=*}
                value=${1#*=}
                has_value=1
                ;;
            --*)
                flag=$1
                value=""
                has_value=0
                ;;
            *)
                die_usage "unexpected argument '$1'. See $SCRIPT_NAME --help."
                ;;
        esac

        _option_index "$flag" || die_usage "unknown option $flag. See $SCRIPT_NAME --help."
        i=$FOUND_OPTION_INDEX
        kind=${OPTION_KINDS[i]}
        if [ "$kind" = switch ]; then
            [ "$has_value" = 0 ] || die_usage "option $flag takes no value, got '$1'"
            printf -v "${OPTION_VARS[i]}" '%s' 1
            shift
        elif [ "$has_value" = 1 ]; then
            printf -v "${OPTION_VARS[i]}" '%s' "$value"
            shift
        else
            [ $# -ge 2 ] || die_usage "option $flag needs a value (${OPTION_METAVARS[i]})"
            printf -v "${OPTION_VARS[i]}" '%s' "$2"
            shift 2
        fi
    done
}

# Exit 2 naming every listed setting that is empty, with its flag and
# environment variable. PROJECT is skipped outside --dry-run because
# resolve_project can still read it from gcloud.
require_settings() {
    local var i missing=""
    for var in "$@"; do
        if [ -n "${!var:-}" ]; then
            continue
        fi
        if [ "$var" = PROJECT ] && [ "$DRY_RUN" != 1 ]; then
            continue
        fi
        for i in "${!OPTION_VARS[@]}"; do
            if [ "${OPTION_VARS[i]}" = "$var" ]; then
                missing="$missing${missing:+, }${OPTION_FLAGS[i]} (or environment variable ${OPTION_ENVS[i]})"
            fi
        done
    done
    if [ -n "$missing" ]; then
        die_usage "missing required setting: $missing. See $SCRIPT_NAME --help."
    fi
}

require_gcloud() {
    if [ "$DRY_RUN" != 1 ] && ! command -v gcloud >/dev/null 2>&1; then
        die "gcloud not found on PATH. Install the Google Cloud CLI, or use --dry-run to print the commands."
    fi
}

# Fill PROJECT from gcloud's configuration when neither --project nor
# JRESID_TPU_PROJECT set it. Under --dry-run it exits 2 instead of calling gcloud.
resolve_project() {
    if [ -n "$PROJECT" ]; then
        return 0
    fi
    if [ "$DRY_RUN" = 1 ]; then
        die_usage "missing required setting: --project (or environment variable JRESID_TPU_PROJECT); --dry-run does not read gcloud's configured project."
    fi
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
    if [ -z "$PROJECT" ] || [ "$PROJECT" = "(unset)" ]; then
        PROJECT=""
        die_usage "missing required setting: --project (or environment variable JRESID_TPU_PROJECT), and gcloud has no configured project (gcloud config set project PROJECT)."
    fi
    info "using gcloud's configured project $PROJECT"
}

require_positive_integer() {
    local var=$1 flag=$2
    case ${!var} in
        '' | *[!0-9]* | 0*)
            die_usage "invalid $flag '${!var}': expected a positive integer"
            ;;
    esac
}

# Run ids become directory names on every worker and are pasted unquoted into
# remote globs, so they are limited to characters that need no quoting.
require_run_id() {
    local flag=$1
    case $RUN in
        '' | .* | *[!A-Za-z0-9._-]*)
            die_usage "invalid $flag '$RUN': use letters, digits, '.', '_' and '-', not starting with '.'"
            ;;
    esac
}

# Print a path as a word for the remote POSIX shell. A leading "~/" becomes
# "$HOME"/ so that it still expands although the rest is quoted.
remote_shell_path() {
    # shellcheck disable=SC2016,SC2088 # "$HOME" and "~" are for the remote shell
    case $1 in
        '~') printf '"$HOME"' ;;
        '~/'*) printf '"$HOME"/%s' "$(shell_quote "${1#\~/}")" ;;
        *) shell_quote "$1" ;;
    esac
}

# Print a path on a worker in the form scp expects after "NAME:". "~/..."
# becomes a path relative to the remote home directory, which both the scp
# and the SFTP protocol accept. A path that is neither absolute nor "~/..."
# is relative to the repository copy, because launch.sh starts the sweep there.
scp_remote_path() {
    # shellcheck disable=SC2088 # "~" is a path on the worker
    case $1 in
        '~') printf '.' ;;
        '~/'*) printf '%s' "${1#\~/}" ;;
        /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$REMOTE_REPO_DIR" "$1" ;;
    esac
}

# gcloud compute tpus tpu-vm SUBCOMMAND ARGS... with the project and zone.
gcloud_tpu_vm() {
    local subcommand=$1
    shift
    run gcloud compute tpus tpu-vm "$subcommand" "$@" --project="$PROJECT" --zone="$ZONE"
}

# Run REMOTE_COMMAND on every worker at once, each through its login shell.
ssh_all_workers() {
    local remote_command=$1
    local flags=(--worker=all)
    if [ "${INTERNAL_IP:-0}" = 1 ]; then
        flags+=(--internal-ip)
    fi
    gcloud_tpu_vm ssh "$NAME" "${flags[@]}" --command="$remote_command"
}
