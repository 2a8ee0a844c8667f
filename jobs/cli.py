"""``vmae``: one CLI, one subcommand per job.

Subcommand modules are imported lazily (``vmae --help`` must not pay for importing ray/torch). Each module
named here exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from jobs.config import describe

# name -> (module, one-line help). Order is the order of the workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("jobs.data.synth", "generate a labelled synthetic multi-domain video set into a folder/bucket"),
    "shard": ("jobs.data.shard", "raw videos -> transcoded WebDataset shards + index + manifest (Ray job)"),
    "curate": (
        "jobs.data.curate",
        "per-sample quality/domain metrics over a shard set -> curation.parquet (Ray job)",
    ),
    "embed": (
        "jobs.data.embed",
        "a checkpoint's embeddings, learnability and semantic groups per clip (Ray job)",
    ),
    "subset": ("jobs.data.subset", "select a subset of a curated shard set -> subset manifest (no copies)"),
    "pretrain": ("jobs.train.pretrain", "VideoMAE pretraining with Ray Train (fault tolerant, elastic)"),
    "finetune": ("jobs.train.finetune", "supervised finetuning from a pretrained checkpoint with Ray Train"),
    "eval": ("jobs.eval.eval", "top-1/top-5 multi-view eval, linear probe and kNN on frozen features"),
    "study": ("jobs.study.study", "grid of pretrain -> evaluate over subsets; table and plots"),
    "submit": ("jobs.submit", "submit any vmae subcommand to a Ray cluster as a Ray job"),
    "status": ("jobs.submit", "status of a submitted Ray job"),
    "logs": ("jobs.submit", "logs of a submitted Ray job"),
    "stop": ("jobs.submit", "stop a submitted Ray job"),
    "model-info": ("jobs.eval.model_info", "parameter count and FLOPs per clip of a model config"),
    "export": (
        "jobs.eval.export",
        "convert a checkpoint to the vmae, Hugging Face or official VideoMAE format",
    ),
}


def config_registry() -> dict[str, type]:
    """Config folder (``configs/<job>``) -> the config class its YAMLs load into, as each command module
    declares it (``CONFIG_DIR``, ``CONFIG_CLASS``; more folders in ``CONFIG_DIRS``). Imports every command
    module."""
    out: dict[str, type] = {}
    for module_name, _ in COMMANDS.values():
        module = importlib.import_module(module_name)
        if hasattr(module, "CONFIG_DIR"):
            out[module.CONFIG_DIR] = module.CONFIG_CLASS
        out.update(getattr(module, "CONFIG_DIRS", {}))
    return out


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmae", description="VideoMAE on Ray: shard, curate, pretrain, study."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def show_config(cls: type) -> str:
    """Every key of a command's config with its type, default and meaning, one per line."""
    rows = describe(cls)
    width = max(len(k) for k, *_ in rows)
    lines = [f"{k:<{width}}  {t:<14} default {d}" + (f"  # {note}" if note else "") for k, t, d, note in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Bad input (a config, an argument, a missing file) is one line on stderr and exit
    code 2; a failure of the environment (disk, permissions, network) one line and exit code 1. ``--debug``
    (anywhere) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / the unknown-command error and exits
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    if not _available(module_name):
        parser.error(f"command {name!r} is not available in this build")
    module = importlib.import_module(module_name)  # lazily: `vmae --help` imports no ray or torch
    cmd_parser = argparse.ArgumentParser(
        prog=f"vmae {name}", description=help_text,
        epilog=f"vmae {name} --show-config lists every config key" if hasattr(module, "CONFIG_CLASS") else None,
    )  # fmt: skip
    if "--show-config" in argv[1:] and hasattr(module, "CONFIG_CLASS"):
        print(show_config(module.CONFIG_CLASS))
        return 0
    try:
        if hasattr(module, "add_command_arguments"):  # modules serving several commands (submit/status/...)
            module.add_command_arguments(name, cmd_parser)
            args = cmd_parser.parse_args(argv[1:])
            return int(module.run_command(name, args) or 0)
        module.add_arguments(cmd_parser)
        args = cmd_parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:
        if debug:
            raise
        bad_input = isinstance(e, ValueError | FileNotFoundError | IsADirectoryError | NotADirectoryError)
        print(f"vmae {name}: {'error' if bad_input else 'failed'}: {_one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 2 if bad_input else 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
