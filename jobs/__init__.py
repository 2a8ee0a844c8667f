"""Jobs: the Ray side of vmae, wiring ``pipeline/`` and ``model/`` together.

Where a command's code lives: ``vmae X`` is ``jobs/<package>/X.py`` (``-`` becomes ``_``), as ``jobs.cli.COMMANDS``
lists. Packages, and the one direction their imports go (a package imports only those to its right):

    demo -> study -> data -> eval -> train -> config, ray_utils

- ``jobs/data``: ``synth``, ``shard``, ``curate`` (+ ``curate_report``), ``embed``, ``subset``: shard sets and
  curation tables.
- ``jobs/eval``: ``eval``, ``export``, ``model_info``; ``features`` (frozen-encoder features on an actor pool) and
  ``metrics`` (top-k, kNN, linear probe).
- ``jobs/train``: ``pretrain``, ``finetune`` (the tasks and their commands), ``trainer`` (the one training loop),
  ``session`` (where the loop runs: Ray Train or in process), ``launch``, ``config``, ``optim``,
  ``checkpointing``, ``metrics``, ``lineage``.
- ``jobs/study``: ``study`` (the command), ``cells`` (pretrain -> finetune/eval per cell), ``data`` (preparing a
  study's data), ``report``.
- top level: ``cli`` (the ``vmae`` entry point), ``config`` (YAML + overrides), ``ray_utils`` (the one home of
  ``ray.init`` and the bounded task map), ``submit`` (Ray jobs on a cluster), ``demo``.
"""
