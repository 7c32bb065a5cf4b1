"""The distributed engine a run trains on, set up through Accelerate, and what FineGates needs around it.

- One group or none: processes started as a group (``WORLD_SIZE`` > 1, as ``accelerate launch`` and
  ``torchrun`` set it) either form that one group or the run is refused, never two independent runs
  writing one directory. On a machine without a GPU such a launch runs on the CPU (gloo).
- FSDP on the CPU: Accelerate applies its FSDP plugin to GPU groups only and silently trains a CPU
  group with DDP instead; here a CPU group launched with FSDP gets the FSDP plugin it asked for
  (``fully_shard`` runs on gloo), so the same launch trains the same way with or without a GPU.
- Gates outside their block's forward: :func:`finegates.sharding.full_gates` (the library's, since
  the sparsity engine reads gates between steps too).
- The end of the run: :func:`full_model` gathers the full state dict on the main process into a
  parameterless copy of the gated model made before sharding, which compaction then reads.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from torch import nn

from .errors import UsageError
from .model_loading import first_line

__all__ = ["launch_world_size", "make_accelerator", "engine", "meta_copy", "full_model"]

# Accelerate's launch switches for engines this tool does not run on.
_UNSUPPORTED = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def launch_world_size() -> int:
    """How many processes the launcher started as one group (1 when not launched as a group)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UsageError(f"the launcher's WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _check_engine_settings() -> None:
    """The engine settings of the launch that the run cannot honour, refused before Accelerate starts."""
    if _single_process_of_a_group():
        raise UsageError(
            "accelerate launch --cpu --num_processes N started a single process (Accelerate's simple launcher, "
            "without a multi-CPU config file); for N CPU processes as one group launch "
            "`torchrun --standalone --nproc_per_node N -m finegates ... --cpu`")
    for var, name in _UNSUPPORTED.items():
        if os.environ.get(var, "false").lower() == "true":
            raise UsageError(f"{name} is not supported; launch with --use_fsdp (FSDP) or without it (DDP)")
    if not _fsdp_requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")  # accelerate launch's default is version 1
    if version != "2":
        raise UsageError(
            f"FSDP version {version} is not supported: pass --fsdp_version 2 (version 1 flattens each block into one "
            "sharded parameter, so the gates cannot be read between steps, and it does not run on CPU processes)")


def _shard_on_cpu(accelerator) -> None:
    """What Accelerate's state does for a GPU group launched with FSDP, for a CPU group."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # configured by the launcher's FSDP_* environment
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _single_process_of_a_group() -> bool:
    """Accelerate's simple launcher asked for several processes (it sets the rendezvous address only
    then) but started this one alone: no ``WORLD_SIZE``."""
    return (os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ)


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def make_accelerator(args, *, log_with: Optional[str], project_dir: str):
    """The run's Accelerator, on the engine the launch asked for, or a :class:`UsageError`.

    Sets ``args.cpu`` when processes launched as a group find no GPU (they then form one CPU group)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    _check_engine_settings()
    world = launch_world_size()
    if world > 1 and not args.cpu and not _has_gpu():
        args.cpu = True
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision, cpu=args.cpu,
            log_with=log_with, project_dir=project_dir,
        )
    except (RuntimeError, ValueError) as e:  # Accelerate's own checks of the launch's settings
        raise UsageError(f"Accelerate refused the launch's settings: {first_line(e)}") from None
    if _fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _shard_on_cpu(accelerator)
    if accelerator.num_processes != world:
        raise UsageError(
            f"the launcher started {world} processes but they did not form one group "
            f"(Accelerate sees {accelerator.num_processes}); on a machine without a GPU add --cpu, "
            "or launch one process")
    if _fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        raise UsageError(f"the launch asked for FSDP but Accelerate set up {accelerator.distributed_type.value}")
    return accelerator


def engine(accelerator) -> str:
    """``"fsdp2"``, ``"fsdp1"``, ``"ddp"`` or ``"single"``: what metrics.json records."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no storage): the shape of the
    model for :func:`full_model` to fill. Buffers are copied (a non-persistent buffer, such as
    rotary frequencies, is in no state dict)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def full_model(accelerator, prepared: nn.Module, skeleton: Optional[nn.Module], prefix: str = "model.") -> Optional[nn.Module]:
    """The trained model whole on the main process (``None`` elsewhere): the full state dict of the
    sharded ``prepared`` module (keys under ``prefix``), gathered onto the main process's CPU,
    assigned into ``skeleton`` (:func:`meta_copy` of the model before sharding). Every process must call it."""
    state = accelerator.get_state_dict(prepared)
    if not accelerator.is_main_process:
        return None
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    skeleton.load_state_dict(own, strict=True, assign=True)
    return skeleton
