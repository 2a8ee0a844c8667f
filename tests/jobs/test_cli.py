"""``vmae X`` lives in ``jobs/<package>/X.py`` (``-`` becomes ``_``), so a newcomer finds a command's code by its
name; ``status``/``logs``/``stop`` are served by ``jobs.submit`` with ``submit``. ``vmae --help`` imports no
command module (no ray, no torch)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
SERVED_BY_SUBMIT = {"status", "logs", "stop"}


def test_command_module_is_named_after_the_command() -> None:
    for name, (module, _) in COMMANDS.items():
        if name in SERVED_BY_SUBMIT:
            assert module == "jobs.submit", (name, module)
        else:
            assert module.rsplit(".", 1)[-1] == name.replace("-", "_"), (name, module)
            assert module.split(".")[0] == "jobs" and module.count(".") <= 2, module
        assert importlib.util.find_spec(module) is not None, module


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys, jobs.cli as c; c.build_parser().format_help(); "
        "print(sorted(m for m in {'ray', 'torch', *(m for m, _ in c.COMMANDS.values())} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _Result:
    """What ``fit`` returns (a ``ray.train.Result``), as far as the commands read it."""

    metrics = {"step": 3, "loss": 0.5, "train_top1": 0.25}
    checkpoint = type("Checkpoint", (), {"path": "/runs/x/step_00000003"})()


def _run(command: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, list]:
    module = importlib.import_module(COMMANDS[command][0])
    calls: list = []
    monkeypatch.setattr(
        module, "fit", lambda cfg, *, resume: calls.append(("fit", cfg.name, resume)) or _Result()
    )
    monkeypatch.setattr("jobs.train.launch.init_ray", lambda address: calls.append(("ray", address)))
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    code = module.run(parser.parse_args(argv))
    return code, capsys.readouterr().out, calls


def test_training_commands_share_one_cli_and_keep_their_line(monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    code, out, calls = _run("pretrain", ["--config", "configs/pretrain/debug.yaml", "name=pt", "--resume",
                                         "--address", "ray://head:10001"], monkeypatch, capsys)  # fmt: skip
    assert code == 0 and calls == [("ray", "ray://head:10001"), ("fit", "pt", True)]
    assert out == "pretrain pt: step 3 loss 0.5 checkpoint /runs/x/step_00000003 model (not finished)\n"
    code, out, calls = _run(
        "finetune", ["--config", "configs/finetune/debug.yaml", "name=ft"], monkeypatch, capsys
    )
    assert code == 0 and calls == [("fit", "ft", False)]  # no --address: fit starts a local Ray
    assert out == "finetune ft: step 3 loss 0.5 train_top1 0.25 classifier (not finished)\n"
