"""``vmae submit / status / logs / stop``: run any vmae subcommand on a Ray cluster as a Ray job.

Why Ray Jobs and not a Ray Client connection (a ``ray://`` address): the driver then runs *on* the cluster,
next to the data and the GPUs, and survives the laptop closing its lid. The project source travels as a
``working_dir`` (minus the virtualenv, git history and run outputs, which would otherwise make the upload
gigabytes), object storage credentials travel as ``env_vars`` unless the cluster has its own (Kubernetes
Secret, IRSA, instance profile; see infra/README.md).

Exit codes: 0 the job SUCCEEDED, 1 FAILED (or the head is unreachable / the job unknown), 2 bad flags,
3 STOPPED, 130 interrupted while following (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import socket
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TextIO

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.runtime_env import RuntimeEnv

from jobs.cli import COMMANDS
from jobs.config import from_dict

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# gitignore-style patterns relative to the working_dir (leading "/" anchors at its root). Ray also honours
# the project's .gitignore; these make the upload small even where .gitignore is missing or incomplete.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/.venv/",
    "/.git/",
    "/runs/",
    "/data/",
    "/demo_out/",
    "/studies/",  # vmae study's default output folder
    "/benchmarks/results/tmp/",
    "/.whl/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.pyc",
)

# Object-storage settings read by pipeline/storage.py, s3fs and boto3 that are not secret: forwarded when set
# locally so that a job sees the same endpoint and region as the shell that submitted it. Credentials are
# never forwarded: a runtime_env's env_vars are stored in the job's metadata (anyone who can list jobs reads
# them) and written into Ray's session logs. The cluster brings its own (a Kubernetes Secret, an instance
# role / IRSA: infra/README.md). AWS_PROFILE & co. name local files: not forwarded either.
PASSTHROUGH_ENV: tuple[str, ...] = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
WITHHELD_ENV: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


class ClusterUnreachableError(ConnectionError):
    """The Ray dashboard (Jobs API) at the given address does not answer."""


def project_root() -> str:
    """The directory holding ``pyproject.toml`` and ``jobs/`` (editable install), else the cwd."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return here if os.path.isfile(os.path.join(here, "pyproject.toml")) else os.getcwd()


def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """Jobs API URL: ``address``, else ``$RAY_ADDRESS``, else :data:`DEFAULT_ADDRESS`; ``host:port`` gets
    ``http://``. Raises ValueError for a Ray Client (``ray://``) or other non-HTTP address."""
    raw = (address or environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip()
    if "://" not in raw:
        raw = "http://" + raw
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(
            f"--address {raw!r}: the Jobs API needs the dashboard URL, e.g. http://HEAD:8265 "
            f"(scheme {parsed.scheme!r} is not http/https)"
        )
    if not parsed.hostname:
        raise ValueError(f"--address {raw!r} has no host")
    return raw.rstrip("/")


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> dict; the value may contain ``=`` and be empty."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if (
            not sep
            or not key
            or not (key[0].isalpha() or key[0] == "_")
            or not key.replace("_", "").isalnum()
        ):
            raise ValueError(f"--env {item!r} is not of the form NAME=VALUE with a valid variable name")
        out[key] = value
    return out


def read_requirements(path: str) -> list[str]:
    """Requirement lines of a requirements.txt (comments and blank lines dropped)."""
    if not os.path.isfile(path):
        raise ValueError(f"--requirements {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        lines = [line.split(" #", 1)[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubmitConfig:
    """Everything ``vmae submit`` sends besides the command. Built from the CLI flags."""

    address: str = DEFAULT_ADDRESS
    working_dir: str | None = None  # None: rely on the package installed in the cluster image
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    pip: tuple[str, ...] = ()
    uv: bool = False  # install ``pip`` packages with uv instead of pip
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pass_aws_env: bool = True
    python: str = "python"
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    submission_id: str | None = None

    def __post_init__(self) -> None:
        if self.working_dir is not None and not os.path.isdir(self.working_dir):
            raise ValueError(f"--working-dir {self.working_dir!r} is not a directory")
        if self.uv and not self.pip:
            raise ValueError("--uv needs packages from --pip or --requirements")
        for name in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if not self.python.strip():
            raise ValueError("--python must name an interpreter")


def build_runtime_env(cfg: SubmitConfig, environ: Mapping[str, str] = os.environ) -> dict:
    """The job's ``runtime_env`` dict, validated by ``ray.runtime_env.RuntimeEnv``.

    ``env_vars``: PYTHONUNBUFFERED (logs stream line by line), the locally set :data:`PASSTHROUGH_ENV`
    (unless ``pass_aws_env`` is off), then ``cfg.env`` which wins.
    """
    env_vars = {"PYTHONUNBUFFERED": "1"}
    if cfg.pass_aws_env:
        env_vars.update({k: environ[k] for k in PASSTHROUGH_ENV if environ.get(k)})
    env_vars.update(cfg.env)
    leaked = sorted(k for k in env_vars if k in WITHHELD_ENV)
    if leaked:
        raise ValueError(f"--env {leaked}: credentials are never sent in a job's runtime_env (its metadata is "
                         "readable by anyone who can list jobs); give the cluster its own (infra/README.md)")  # fmt: skip
    runtime_env: dict = {"env_vars": env_vars}
    if cfg.working_dir is not None:
        runtime_env["working_dir"] = os.path.abspath(cfg.working_dir)
        runtime_env["excludes"] = list(cfg.excludes)
    if cfg.pip:
        runtime_env["uv" if cfg.uv else "pip"] = {"packages": list(cfg.pip)}
    RuntimeEnv(**runtime_env)  # raises on malformed fields before anything is uploaded
    return runtime_env


def build_entrypoint(command: Sequence[str], *, raw: bool = False, python: str = "python") -> str:
    """Shell command line the job runs: ``python -m jobs.cli <command>``, or ``command`` itself if raw.

    Each argument is shell-quoted, so ``shlex.split`` of the result gives back exactly the arguments.
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise ValueError("no command given: put the vmae subcommand after `--`, e.g. -- model-info")
    if raw:
        return shlex.join(args)
    cluster_commands = sorted(set(COMMANDS) - {"submit", "status", "logs", "stop"})
    if args[0] not in cluster_commands:
        raise ValueError(
            f"command {args[0]!r} is not a vmae subcommand to run on a cluster: {cluster_commands}"
        )
    return shlex.join([*shlex.split(python), "-m", "jobs.cli", *args])


def connect(address: str, *, timeout_s: float = 10.0) -> JobSubmissionClient:
    """A Jobs API client for ``address``; raises :class:`ClusterUnreachableError` with a hint when the
    dashboard does not answer within ``timeout_s`` seconds (the client itself could hang on a silent host)."""
    parsed = urllib.parse.urlsplit(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    hint = (
        f"cannot reach the Ray dashboard at {address}: is the head running with the dashboard enabled "
        "(ray[default]), and is its port forwarded (e.g. kubectl port-forward svc/<cluster>-head-svc 8265)? "
        "Set --address or RAY_ADDRESS."
    )
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
        return JobSubmissionClient(address)
    except (OSError, ConnectionError) as e:
        raise ClusterUnreachableError(f"{hint} ({e})") from e


def wait_for_terminal(
    client: JobSubmissionClient, job_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5
) -> JobStatus:
    """Poll until the job is SUCCEEDED/FAILED/STOPPED; returns the last status (non-terminal on timeout)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() >= deadline):
            return status
        time.sleep(poll_s)


def follow_logs(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout) -> JobStatus:
    """Stream the job's logs to ``out`` until it ends; returns its terminal status.

    If the log websocket breaks (proxy idle timeouts), falls back to polling and prints what was missed.
    """

    written = 0  # characters already on ``out``; kept when the stream breaks mid-way

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - any transport error: fall back to polling
        print(f"log stream interrupted ({e}); polling until the job ends", file=sys.stderr)
    status = wait_for_terminal(client, job_id)
    rest = client.get_job_logs(job_id)[written:]
    if rest:
        out.write(rest)
        out.flush()
    return status


def exit_code(status: JobStatus | str) -> int:
    """Process exit code for a terminal job status (see module docstring)."""
    return EXIT_CODES.get(str(status), 1)


_SUBMIT_FLAGS: tuple[tuple[str, dict], ...] = (
    (
        "--working-dir",
        {"default": None, "help": "directory uploaded as the job's cwd (default: project root)"},
    ),
    ("--no-working-dir", {"action": "store_true", "help": "upload nothing; run the vmae of the image"}),
    ("--exclude", {"action": "append", "default": [], "help": "extra gitignore-style upload exclude"}),
    ("--pip", {"action": "append", "default": [], "help": "package to install for the job (repeat)"}),
    ("--requirements", {"default": None, "help": "requirements.txt to install for the job"}),
    ("--uv", {"action": "store_true", "help": "install --pip/--requirements with uv instead of pip"}),
    ("--env", {"action": "append", "default": [], "help": "NAME=VALUE for the job (repeat)"}),
    ("--no-aws-env", {"action": "store_true", "help": "do not forward the local AWS_* variables"}),
    ("--python", {"default": "python", "help": "interpreter on the cluster (default: python)"}),
    ("--entrypoint-num-cpus", {"type": float, "default": None, "help": "CPUs reserved for the driver"}),
    ("--entrypoint-num-gpus", {"type": float, "default": None, "help": "GPUs reserved for the driver"}),
    ("--job-id", {"default": None, "help": "submission id to use (default: generated)"}),
    ("--raw", {"action": "store_true", "help": "run the command as is, not via `python -m jobs.cli`"}),
    ("--no-wait", {"action": "store_true", "help": "print the job id and return"}),
)


def add_command_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Flags of ``vmae <name>`` for name in submit/status/logs/stop."""
    parser.add_argument(
        "--address", default=None, help=f"Ray dashboard URL (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})"
    )
    if name == "submit":
        for flag, kwargs in _SUBMIT_FLAGS:
            parser.add_argument(flag, **kwargs)
        parser.add_argument("command", nargs=argparse.REMAINDER, help="-- <vmae subcommand and its args>")
    elif name == "status":
        parser.add_argument("job_id", nargs="?", default=None, help="job id (omit to list all jobs)")
    elif name == "logs":
        parser.add_argument("job_id")
        parser.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    elif name == "stop":
        parser.add_argument("job_id")
        parser.add_argument("--no-wait", action="store_true", help="do not wait for the job to stop")
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for STOPPED")
    else:
        raise ValueError(f"command {name!r} is not served by jobs.submit")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> SubmitConfig:
    """Validated :class:`SubmitConfig` from parsed ``vmae submit`` flags."""
    if args.working_dir is not None and args.no_working_dir:
        raise ValueError("--working-dir and --no-working-dir exclude each other")
    pip = list(args.pip) + (read_requirements(args.requirements) if args.requirements else [])
    data = {
        "address": resolve_address(args.address, environ),
        "working_dir": None if args.no_working_dir else (args.working_dir or project_root()),
        "excludes": [*DEFAULT_EXCLUDES, *args.exclude],
        "pip": pip,
        "uv": args.uv,
        "env": parse_env(args.env),
        "pass_aws_env": not args.no_aws_env,
        "python": args.python,
        "entrypoint_num_cpus": args.entrypoint_num_cpus,
        "entrypoint_num_gpus": args.entrypoint_num_gpus,
        "submission_id": args.job_id,
    }
    return from_dict(SubmitConfig, data, where="vmae submit")


def submit(
    cfg: SubmitConfig, command: Sequence[str], *, raw: bool = False, agent_wait_s: float = 60.0
) -> tuple[JobSubmissionClient, str]:
    """Submit ``command`` as a Ray job; returns (client, job id).

    A head that just started answers "No available agent to submit job, please try again later" until
    its job agent registers; that answer is retried for up to ``agent_wait_s`` seconds.
    """
    entrypoint = build_entrypoint(command, raw=raw, python=cfg.python)
    runtime_env = build_runtime_env(cfg)
    client = connect(cfg.address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=cfg.submission_id,
                entrypoint_num_cpus=cfg.entrypoint_num_cpus,
                entrypoint_num_gpus=cfg.entrypoint_num_gpus,
            )
            return client, job_id
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _print_jobs(client: JobSubmissionClient) -> None:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'JOB ID':<32} {'STATUS':<10} ENTRYPOINT")
    for job in jobs:
        print(f"{job.submission_id or job.job_id or '-':<32} {job.status!s:<10} {job.entrypoint}")


def _print_job(info) -> None:
    def when(ms: int | None) -> str | None:
        return ms and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1e3))

    fields = {
        "job_id": info.submission_id or info.job_id,
        "status": str(info.status),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "start_time": when(info.start_time),
        "end_time": when(info.end_time),
        "driver_exit_code": info.driver_exit_code,
    }
    for key, value in fields.items():
        if value is not None:
            print(f"{key}: {value}")


def _run(name: str, args: argparse.Namespace) -> int:
    if name == "submit":
        cfg = config_from_args(args)
        client, job_id = submit(cfg, args.command, raw=args.raw)
        if args.no_wait:
            print(job_id)
            print(f"submitted to {cfg.address}; follow with: vmae logs {job_id} --follow", file=sys.stderr)
            return 0
        print(f"job {job_id} submitted to {cfg.address}", file=sys.stderr)
        try:
            status = follow_logs(client, job_id)
        except KeyboardInterrupt:
            print(f"\njob {job_id} keeps running; stop it with: vmae stop {job_id}", file=sys.stderr)
            return 130
        print(f"job {job_id} {status}", file=sys.stderr)
        return exit_code(status)

    client = connect(resolve_address(args.address))
    if name == "status":
        if args.job_id is None:
            _print_jobs(client)
        else:
            _print_job(client.get_job_info(args.job_id))
        return 0
    if name == "logs":
        if args.follow:
            return exit_code(follow_logs(client, args.job_id))
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    if name == "stop":
        requested = client.stop_job(args.job_id)
        if not requested:
            status = client.get_job_status(args.job_id)
            print(f"job {args.job_id} already ended: {status}", file=sys.stderr)
            return 0
        if args.no_wait:
            print(f"stop requested for job {args.job_id}", file=sys.stderr)
            return 0
        status = wait_for_terminal(client, args.job_id, timeout_s=args.timeout)
        print(f"job {args.job_id} {status}", file=sys.stderr)
        return 0 if status.is_terminal() else 1
    raise ValueError(f"command {name!r} is not served by jobs.submit")


def run_command(name: str, args: argparse.Namespace) -> int:
    """Run ``vmae <name>``; user-facing failures become one line on stderr and exit code 1."""
    try:
        return _run(name, args)
    except ValueError as e:  # bad flags or command: say which, no traceback
        print(f"vmae {name}: error: {e}", file=sys.stderr)
        return 2
    except ClusterUnreachableError as e:
        print(f"vmae {name}: {e}", file=sys.stderr)
        return 1
    except AuthenticationError as e:
        print(
            f"vmae {name}: the cluster uses token auth; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN. {e}",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:  # the Jobs API answers unknown ids with a 404 RuntimeError
        if "404" in str(e) or "does not exist" in str(e):
            print(f"vmae {name}: no job {getattr(args, 'job_id', None)!r} there: {e}", file=sys.stderr)
            return 1
        raise
