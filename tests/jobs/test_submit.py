"""`vmae submit/status/logs/stop` without a cluster: address, env, entrypoint, runtime_env, upload contents."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import zipfile
from pathlib import Path

import pytest

from jobs import submit as sub
from jobs.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(name: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub.add_command_arguments(name, parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("http://head:8265/", {}, "http://head:8265"),
        ("head:8265", {}, "http://head:8265"),
        ("https://ray.example.com", {}, "https://ray.example.com"),
        (None, {"RAY_ADDRESS": "http://10.0.0.5:8265"}, "http://10.0.0.5:8265"),
        ("http://flag:1", {"RAY_ADDRESS": "http://env:2"}, "http://flag:1"),
        (None, {}, "http://127.0.0.1:8265"),
    ],
)
def test_resolve_address(flag, env, expected):
    assert sub.resolve_address(flag, env) == expected


@pytest.mark.parametrize("bad", ["ray://head:10001", "grpc://head:1", "http://:8265"])
def test_resolve_address_rejects_non_dashboard_urls(bad):
    with pytest.raises(ValueError, match="--address"):
        sub.resolve_address(bad, {})


def test_parse_env():
    assert sub.parse_env(["A=1", "B_2=x=y", "EMPTY="]) == {"A": "1", "B_2": "x=y", "EMPTY": ""}
    for bad in ["NOEQUALS", "=v", "1A=v", "A-B=v"]:
        with pytest.raises(ValueError, match="--env"):
            sub.parse_env([bad])


def test_read_requirements(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# pinned for the cluster\nnumpy==1.26.4  # comment\n\n  einops>=0.7\n--extra-index-url https://x\n"
    )
    assert sub.read_requirements(str(req)) == ["numpy==1.26.4", "einops>=0.7", "--extra-index-url https://x"]
    with pytest.raises(ValueError, match="--requirements"):
        sub.read_requirements(str(tmp_path / "missing.txt"))


def test_entrypoint_round_trips_through_the_shell():
    args = [
        "pretrain",
        "--config",
        "configs/pretrain/debug.yaml",
        "train.lr=1e-3",
        'name=it\'s a "run" $HOME',
    ]
    entry = sub.build_entrypoint(["--", *args], python="python3 -X faulthandler")
    assert shlex.split(entry) == ["python3", "-X", "faulthandler", "-m", "jobs.cli", *args]
    raw = ["python", "-c", "print('a; b')"]
    assert shlex.split(sub.build_entrypoint(raw, raw=True)) == raw


@pytest.mark.parametrize(
    ("command", "match"),
    [
        ([], "no command"),
        (["--"], "no command"),
        (["nope"], "'nope'"),
        (["submit", "--", "shard"], "'submit'"),
    ],
)
def test_entrypoint_rejects_bad_commands(command, match):
    with pytest.raises(ValueError, match=match):
        sub.build_entrypoint(command)


def test_runtime_env_forwards_endpoint_never_credentials(tmp_path):
    """A runtime_env is job metadata (``ray job list`` shows it; Ray logs it): the endpoint and region travel,
    credentials never do, even when asked for with --env."""
    environ = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "planted-secret",
        "AWS_SESSION_TOKEN": "planted-token",
        "AWS_DEFAULT_REGION": "",  # set but empty: not forwarded
        "AWS_PROFILE": "laptop",  # names a local file: never forwarded
        "HOME": "/home/me",
    }
    cfg = sub.SubmitConfig(working_dir=str(tmp_path), env={"SEED": "3"})
    env = sub.build_runtime_env(cfg, environ)
    assert env["working_dir"] == str(tmp_path)
    assert env["excludes"] == list(sub.DEFAULT_EXCLUDES)
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL": "http://minio:9000", "SEED": "3"}
    assert "planted" not in json.dumps(env)
    assert "pip" not in env and "uv" not in env
    quiet = sub.build_runtime_env(sub.SubmitConfig(pass_aws_env=False), environ)
    assert quiet == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    with pytest.raises(ValueError, match="credentials are never sent"):
        sub.build_runtime_env(sub.SubmitConfig(env={"AWS_SECRET_ACCESS_KEY": "x"}), environ)


def test_runtime_env_pip_or_uv():
    assert sub.build_runtime_env(sub.SubmitConfig(pip=("einops",)), {})["pip"] == {"packages": ["einops"]}
    uv_env = sub.build_runtime_env(sub.SubmitConfig(pip=("einops", "timm"), uv=True), {})
    assert uv_env["uv"] == {"packages": ["einops", "timm"]} and "pip" not in uv_env


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"working_dir": "/no/such/dir"}, "--working-dir"),
        ({"uv": True}, "--uv"),
        ({"entrypoint_num_gpus": -1.0}, "--entrypoint-num-gpus"),
        ({"python": " "}, "--python"),
    ],
)
def test_submit_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sub.SubmitConfig(**kwargs)


def test_cli_flags_to_config(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("timm>=1.0\n")
    args = _parse(
        "submit",
        ["--address", "head:8265", "--env", "A=1", "--pip", "einops", "--requirements", str(req), "--uv"]
        + ["--exclude", "/big/", "--entrypoint-num-cpus", "1", "--", "shard", "--config", "c.yaml"],
    )
    cfg = sub.config_from_args(args, environ={})
    assert cfg.address == "http://head:8265"
    assert cfg.working_dir == sub.project_root()
    assert os.path.isfile(os.path.join(cfg.working_dir, "jobs", "cli.py"))
    assert cfg.pip == ("einops", "timm>=1.0") and cfg.uv
    assert cfg.env == {"A": "1"} and cfg.entrypoint_num_cpus == 1.0
    assert cfg.excludes[-1] == "/big/"
    assert shlex.split(sub.build_entrypoint(args.command))[-4:] == ["jobs.cli", "shard", "--config", "c.yaml"]
    no_dir = sub.config_from_args(_parse("submit", ["--no-working-dir", "--", "shard"]), environ={})
    assert no_dir.working_dir is None
    with pytest.raises(ValueError, match="--no-working-dir"):
        sub.config_from_args(_parse("submit", ["--working-dir", ".", "--no-working-dir", "--", "x"]), {})


def _zip_names(root: Path, excludes: list[str], tmp_path: Path) -> tuple[set[str], int]:
    """What Ray would upload: its own packaging code (as used by JobSubmissionClient), .gitignore off."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"pkg-{len(list(tmp_path.iterdir()))}.zip"
    create_package(str(root), target, include_gitignore=False, excludes=excludes)
    with zipfile.ZipFile(target) as zf:
        return {n for n in zf.namelist() if not n.endswith("/")}, target.stat().st_size


def test_upload_excludes_are_anchored(tmp_path):
    """Root-level .venv/runs/data go; a nested `data` package or data.py stays."""
    root = tmp_path / "proj"
    files = [
        "jobs/cli.py",
        "pipeline/data.py",
        "model/data/__init__.py",
        ".venv/lib/torch.so",
        ".git/HEAD",
        "runs/r1/ckpt.pt",
        "data/raw/a.mp4",
        "demo_out/x.mp4",
        "jobs/__pycache__/cli.cpython-311.pyc",
        "vmae.egg-info/PKG-INFO",
    ]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"x")
    names, _ = _zip_names(root, list(sub.DEFAULT_EXCLUDES), tmp_path)
    assert names == {"jobs/cli.py", "pipeline/data.py", "model/data/__init__.py"}


def test_project_upload_is_small(tmp_path):
    names, size = _zip_names(Path(sub.project_root()), list(sub.DEFAULT_EXCLUDES), tmp_path)
    assert {"jobs/cli.py", "jobs/submit.py", "pyproject.toml"} <= names
    assert not any(n.startswith((".venv/", ".git/", "runs/")) for n in names)
    assert size < 20 * 2**20, f"working_dir upload is {size / 2**20:.1f} MiB"


class _FakeClient:
    """Jobs API double: the log websocket breaks after the first chunk."""

    def __init__(self) -> None:
        self.statuses = iter(["RUNNING", "SUCCEEDED"])

    async def tail_job_logs(self, job_id):
        yield "line 1\n"
        raise RuntimeError("WebSocket connection closed unexpectedly")

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(next(self.statuses))

    def get_job_logs(self, job_id):
        return "line 1\nline 2\n"


def test_follow_logs_recovers_missed_output(tmp_path, capsys):
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        status = sub.follow_logs(_FakeClient(), "raysubmit_x", out)
    assert str(status) == "SUCCEEDED"
    assert out_path.read_text() == "line 1\nline 2\n"
    assert "interrupted" in capsys.readouterr().err


def test_exit_codes():
    assert [sub.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "PENDING")] == [0, 1, 3, 1]


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "raysubmit_x"],
        ["status"],
        ["logs", "raysubmit_x"],
        ["stop", "raysubmit_x"],
        ["submit", "--no-wait", "--", "shard"],
    ],
)
def test_unreachable_head_is_a_clear_error(argv, capsys):
    address = f"http://127.0.0.1:{_free_port()}"
    assert main([argv[0], "--address", address, *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at {address}" in err and "RAY_ADDRESS" in err


def test_bad_flags_exit_2_with_the_reason(capsys):
    assert main(["submit", "--address", "ray://head:10001", "--", "shard"]) == 2
    assert "--address 'ray://head:10001'" in capsys.readouterr().err
    assert main(["submit", "--env", "oops", "--", "shard"]) == 2
    assert "--env 'oops'" in capsys.readouterr().err
