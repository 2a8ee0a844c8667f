"""Apply activation checkpointing, torch.compile and FSDP2 to a VideoMAE model, in that order (torchtitan style).

Why a separate module: the model files stay free of torch.distributed; the pretrain/finetune jobs call
``parallelize`` once after building the model. Every transformer ``Block`` (encoder and decoder) is the unit:
it is checkpointed, compiled (``compile="blocks"``), and sharded on its own, so each block's parameters are
gathered just in time. ``compile="model"`` compiles more: the pretraining model's whole ``forward_indexed``
(encoder, decoder, target, token gathers and loss; only the host-side mask sorting before it stays eager, where
its host reads would break the graph), or a classifier's whole forward, so the code between the blocks is fused
too (issue 20: MFU). State-dict keys are unchanged by all three (checkpoint wrappers strip their prefix,
``Module.compile`` and a compiled method do not rename), so checkpoints written after ``parallelize`` load into
a plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from model.layers import Block
from model.videomae import VideoMAE

COMPILE_SCOPES = (False, True, "blocks", "model")  # True = "blocks" (configs written before scopes existed)


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    lists = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and any(isinstance(b, Block) for b in m)
    ]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no transformer Block lists to parallelize")
    return lists


def parallelize(
    model: nn.Module,
    *,
    fsdp: bool = False,
    compile: bool | str = False,
    activation_checkpointing: bool = False,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    compile_backend: str = "inductor",
) -> nn.Module:
    """Modify ``model`` in place and return it.

    - ``activation_checkpointing``: recompute each block's activations in backward (memory ~ depth x fewer
      saved activations, ~1/3 more compute).
    - ``compile``: ``"blocks"`` (or ``True``): ``torch.compile`` each block; ``"model"``: the whole pretraining
      forward after the mask sorting (``VideoMAE.forward_indexed``), or any other model's whole forward;
      ``compile_backend`` "inductor" for speed. ``"model"`` with ``fsdp`` is refused (FSDP's per-block hooks
      would run inside the compiled region, untested here).
    - ``fsdp``: FSDP2 ``fully_shard`` each block, then the root, over ``mesh`` (default: all ranks of the
      initialised process group); ``param_dtype`` (e.g. ``torch.bfloat16``) turns on mixed precision with
      gradients reduced in ``reduce_dtype``. Needs ``torch.distributed`` to be initialised.
    """
    if fsdp and mesh is None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "parallelize(fsdp=True) needs an initialised torch.distributed process group or a mesh"
        )
    if not (isinstance(compile, bool) or compile in ("blocks", "model")):
        raise ValueError(f"compile must be one of {COMPILE_SCOPES}, got {compile!r}")
    if compile == "model" and fsdp:
        raise ValueError('parallelize(compile="model") with fsdp=True is not supported; use compile="blocks"')
    lists = _block_lists(model)
    if activation_checkpointing:
        for blocks in lists:
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    if compile == "model":
        # static shapes, as for the blocks: B, N and K are fixed by the config and the loader's batch
        if isinstance(model, VideoMAE):
            model.forward_indexed = torch.compile(
                model.forward_indexed, backend=compile_backend, fullgraph=True, dynamic=False
            )
        else:
            model.compile(backend=compile_backend, fullgraph=True, dynamic=False)
    elif compile:
        for blocks in lists:
            for block in blocks:
                # static shapes: the token counts are fixed per block list; dynamic=None would mark N, D and the
                # head count symbolic after the first recompile (encoder vs decoder blocks) and slow every step
                block.compile(backend=compile_backend, fullgraph=True, dynamic=False)
    if fsdp:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for blocks in lists:
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
        # the root keeps its inputs as they come: it computes the normalised-pixel target from the video, which
        # must stay float32 (a bf16 cast of the input would quantise the loss target); autocast casts for the
        # patch embedding
        root_mp = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
        )
        fully_shard(model, mesh=mesh, mp_policy=root_mp)
        if hasattr(model, "forward_features"):  # eval/probing entry point: gather params like forward
            register_fsdp_forward_method(model, "forward_features")
    return model
