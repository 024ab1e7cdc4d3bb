"""The one place that knows how models are spread over processes: sharding (PyTorch FSDP2),
precision, CPU offload, gradient checkpointing, sharded checkpoints and full final saves.

The stages call an :class:`Engine` (``make_engine(cfg, accelerator)``) and otherwise read the
same at one CPU process and at eight sharded GPUs:

* ``engine.prepare(model)`` -- a trained model (SFT policy, RM, PPO policy and critic):
  ``model.dtype``, gradient checkpointing, then ``fully_shard`` per transformer block and on
  the entry modules (below). ``engine.frozen(model)`` -- PPO's reference and RM: cast to
  ``model.frozen_dtype``, eval mode, no gradients, never sharded (every process holds a copy,
  so their forwards need no communication).
* ``parallel.sharding=fsdp2``: a 1-D mesh over all processes; params, grads and AdamW states
  are sharded (ZeRO-3 / FSDP "full shard"; Huang et al. ran ZeRO-2). With ``parallel.sharding=none``
  and N > 1 processes the same FSDP2 code runs on an (N, 1) mesh -- "HSDP" with shards of one
  process, i.e. plain data parallel: every process holds full params and the gradients are
  all-reduced (averaged) in the backward. We use FSDP2 here rather than ``DistributedDataParallel``
  because PPO's critic (and the RM's KV-cached pair scoring) run the backbone and the score
  head directly, bypassing the root module's forward; DDP prepares its reducer in that root
  forward and would not sync those gradients, while FSDP2 hooks every module it wraps. At one
  process with ``sharding=none`` nothing is wrapped: the plain fp32 path, bit for bit.
* Gradients are averaged over processes (FSDP2's default divide factor, like DDP); the stages
  normalise their losses by the GLOBAL batch (x num_processes), so N processes take the step
  of one process with the same global batch.
* Entry modules: a causal LM is always called through its root forward -> ``fully_shard(model)``.
  A decoder ``...ForSequenceClassification`` (RM, critic) is read through ``model.base_model``
  and ``model.score`` separately (per-token values, KV-cached pair scores) -> those two are
  sharded as two roots and the outer module is left alone; calling the outer model still works.
* ``parallel.mixed_precision=bf16``: FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`` when wrapped (fp32 master weights and AdamW states, bf16 compute), bf16
  autocast otherwise (``engine.autocast()``). ``parallel.cpu_offload``: ``CPUOffloadPolicy``.
* Checkpoints: wrapped models save their training state with ``torch.distributed.checkpoint``
  (each process writes its shards; any process count can resume it), plus a small ``state.pt``
  (step, scheduler, RNG, ...) that ``torch.load(weights_only=True)`` reads. Unwrapped models keep
  the one-file ``state.pt`` of before (also weights_only-safe). Both are atomic
  (``runtime.CheckpointManager``). Final HF folders: every process takes part in gathering the
  full state dict, the main process writes it once.

Peers: torchtitan applies ``fully_shard`` per transformer block then on the root, with the same
mixed-precision policy; OpenRLHF/Huang et al. use DeepSpeed ZeRO-2 + bf16 for the same job.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from rlhflab.config import ParallelConfig, RunConfig
from rlhflab.errors import StageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHARDS = "shards"  # torch.distributed.checkpoint folder inside a checkpoint directory
STATE_FILE = "state.pt"


def launcher_mixed_precision(pc: ParallelConfig) -> None:
    """Refuse a launcher precision that disagrees with ``parallel.mixed_precision``.

    ``accelerate launch --mixed_precision X`` exports ``ACCELERATE_MIXED_PRECISION=X``; the
    config is the record of the run (it is saved with it), so a different launcher flag is an
    error naming the key rather than silently ignored (or silently obeyed).
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if launched in ("", "no", pc.mixed_precision):
        return
    if launched == "fp16":
        raise StageError("accelerate launch --mixed_precision fp16 is not supported: use bf16 "
                         "(set parallel.mixed_precision=bf16 and launch with --mixed_precision bf16)")
    raise StageError(f"accelerate launch --mixed_precision {launched} but the config says parallel.mixed_precision="
                     f"{pc.mixed_precision}; set parallel.mixed_precision={launched} (or launch with "
                     f"--mixed_precision {pc.mixed_precision})")


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter ``optimizer`` steps, in order: what gradient clipping must cover."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def uses_collectives(module: nn.Module) -> bool:
    """Whether ``module``'s forward communicates with the other processes (it holds an FSDP2 unit):
    then every process must run the same number of forwards, in the same order."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def all_processes(flag: bool, module: nn.Module) -> bool:
    """``flag`` and-ed over the processes when ``module`` is wrapped (else ``flag``): loops that
    call a wrapped model stop together (e.g. generation stopping once every row has its EOS)."""
    if not uses_collectives(module):
        return flag
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=_module_device(module))
    dist.all_reduce(t)
    return int(t.item()) == 0


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters())
    return p.device


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder/encoder blocks of an HF model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise StageError(f"parallel.sharding=fsdp2: cannot find the transformer blocks of {type(model).__name__} "
                         "(no _no_split_modules); use parallel.sharding=none for this model")
    return blocks


def entry_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward the stages call: the root of a causal LM / encoder RM; the
    backbone and score head of a decoder sequence classifier (see the module docstring)."""
    from rlhflab.models.reward import is_decoder_rm, score_head

    if hasattr(model, "score") and is_decoder_rm(model):
        return [model.base_model, score_head(model)]
    return [model]


@dataclass
class Engine:
    """How this run places its models; built once per stage by :func:`make_engine`."""

    pc: ParallelConfig
    dtype: torch.dtype
    frozen_dtype: torch.dtype
    num_processes: int
    process_index: int
    device: torch.device
    mesh: Any = None  # a DeviceMesh when models are wrapped with FSDP2, else None

    @property
    def wrapped(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    # ------------------------------------------------------------------ models
    def prepare(self, model: nn.Module) -> nn.Module:
        """A trained model, in place: on the device, ``model.dtype``, gradient checkpointing, FSDP2 units."""
        model.to(self.device)
        if self.dtype != torch.float32:
            model.to(self.dtype)
        if self.pc.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if not self.wrapped:
            return model
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        kw: dict = {"mesh": self.mesh}
        if self.pc.mixed_precision == "bf16":
            # bf16 compute; gradients reduced and kept in fp32 with the fp32 master weights (AdamW states follow).
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.pc.cpu_offload else OffloadPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, **kw)
        for entry in entry_modules(model):
            fully_shard(entry, **kw)
        return model

    def frozen(self, model: nn.Module) -> nn.Module:
        """A frozen model (PPO reference policy, RM): ``model.frozen_dtype``, eval, no gradients."""
        model.to(self.device)
        if self.frozen_dtype != torch.float32:
            model.to(self.frozen_dtype)
        return model.eval().requires_grad_(False)

    def optimizer(self, params, optim, fused: bool = False) -> torch.optim.AdamW:
        """AdamW for the trained ``params`` (``stages.common.make_optimizer``). Unwrapped: as asked
        (``fused=True`` for PPO). Wrapped in FSDP2: the per-parameter loop (``foreach=False``) --
        torch's fused kernel takes no DTensors, and the default foreach step allocates temporaries
        for the whole parameter list at once (``torch._foreach_*`` results: about one more copy of
        every local shard), which measured +1 GiB per process at a 2-process 150M PPO update
        (benchmarks/RESULTS.md); the loop holds one parameter's temporaries at a time."""
        from rlhflab.stages.common import make_optimizer

        if self.wrapped:
            return make_optimizer(params, optim, foreach=False)
        return make_optimizer(params, optim, fused=fused)

    def autocast(self):
        """bf16 autocast for ``parallel.mixed_precision=bf16`` on unwrapped models (FSDP2's policy casts wrapped ones)."""
        if self.pc.mixed_precision == "bf16" and not self.wrapped:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def gradient_sync(self, model: nn.Module, sync: bool):
        """Context for one micro-batch's backward: ``sync=False`` accumulates gradients locally
        (no reduce-scatter / all-reduce); the last micro-batch of a step syncs the sum."""
        return _GradientSync(model, sync) if self.wrapped else nullcontext()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        # Pass the optimizer's parameters (``optimizer_params``): a wrapped module lists the
        # unsharded tensors of a root unit left gathered by a no-grad forward, whose .grad stays None.
        """Clip the global gradient norm (FSDP2's DTensor gradients: the norm over all shards); returns it."""
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def barrier(self) -> None:
        if self.num_processes > 1:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------- final saves
    def full_state_dict(self, model: nn.Module) -> Optional[dict]:
        """The full (unsharded) state dict on CPU on the main process, None elsewhere; every
        process must call it (it gathers). None for unwrapped models (save them as they are)."""
        if not self.wrapped:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Tied parameters (e.g. a tied LM head) come back as separate gathered copies; point every
        # name of one parameter at one tensor again, so save_pretrained sees the tie and writes the
        # same keys as an unsharded save.
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in sd and id(param) in first and first[id(param)] in sd:
                sd[name] = sd[first[id(param)]]
            first.setdefault(id(param), name)
        return sd

    def save_final(self, final_dir: Path, model: nn.Module, write: Callable[[Path, Optional[dict]], None]) -> None:
        """Write an HF folder once: all processes gather, the main process calls
        ``write(tmp_dir, state_dict)`` (``state_dict`` None = the model's own) into an atomic rename."""
        from rlhflab.runtime import atomic_save_dir

        sd = self.full_state_dict(model)
        if self.is_main:
            atomic_save_dir(final_dir, lambda tmp: write(tmp, sd))
        self.barrier()

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, manager, step: int, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        meta: dict) -> None:
        """``state/ckpt-<step>/`` atomically, every process taking part.

        Unwrapped: ``state.pt`` = ``meta`` + each model's state dict + the optimizer's (main process).
        Wrapped: ``shards/`` (torch.distributed.checkpoint: every process writes its shards of the
        models and the optimizer) + ``state.pt`` = ``meta`` (main process). ``meta`` must hold only
        tensors, numbers, strings and containers of them (``runtime.rng_state`` does), so
        ``torch.load(weights_only=True)`` reads it back.
        """
        if not self.wrapped:
            if self.is_main:
                blob = {**meta, **{k: m.state_dict() for k, m in models.items()}, "optimizer": optimizer.state_dict()}
                manager.save(step, lambda tmp: torch.save(blob, tmp / STATE_FILE))
            self.barrier()
            return
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(nn.ModuleDict(models), optimizer)

        def write(tmp: Path) -> None:  # main process, inside CheckpointManager's atomic save
            dist.broadcast_object_list([str(tmp)], src=0)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDS))
            torch.save(meta, tmp / STATE_FILE)
            dist.barrier()  # every shard is on disk before the directory is renamed into place

        if self.is_main:
            manager.save(step, write)
        else:
            where = [None]
            dist.broadcast_object_list(where, src=0)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(Path(where[0]) / SHARDS))
            dist.barrier()
        self.barrier()  # the rename and the `latest` pointer are done

    def load_checkpoint(self, ckpt_dir: Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
        """Restore models and optimizer from :meth:`save_checkpoint`'s folder; returns its ``meta``.
        A checkpoint damaged on disk is skipped with a warning for the previous one in the same
        ``state/`` folder (``runtime.CheckpointManager.load``)."""
        from rlhflab.runtime import CheckpointManager

        return CheckpointManager(Path(ckpt_dir).parent).load(
            lambda path: self._load_checkpoint(path, models, optimizer), newest=Path(ckpt_dir))[1]

    def _load_checkpoint(self, ckpt_dir: Path, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
        ckpt_dir = Path(ckpt_dir)
        state = load_state_file(ckpt_dir)
        sharded = (ckpt_dir / SHARDS).is_dir()
        if sharded != self.wrapped:
            how = "sharded (FSDP2 / many processes)" if sharded else "unsharded (one process, parallel.sharding=none)"
            raise StageError(f"cannot resume from {ckpt_dir}: it holds an {how} training state; resume with the "
                             "parallel.sharding and process count family it was written with (any process count "
                             "reads a sharded checkpoint once models are wrapped: parallel.sharding=fsdp2 or >1 process)")
        if not sharded:
            for k, m in models.items():
                m.load_state_dict(state.pop(k))
            optimizer.load_state_dict(state.pop("optimizer"))
            return state
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        container = nn.ModuleDict(models)
        model_sd, optim_sd = get_state_dict(container, optimizer)
        want = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(want, checkpoint_id=str(ckpt_dir / SHARDS))
        except Exception as e:  # truncated / foreign shards: say which folder
            raise StageError(f"cannot read sharded checkpoint {ckpt_dir / SHARDS}: {e}") from None
        set_state_dict(container, optimizer, model_state_dict=want["model"], optim_state_dict=want["optimizer"])
        return state


class _GradientSync:
    def __init__(self, model: nn.Module, sync: bool):
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.sync = sync

    def __enter__(self):
        for u in self.units:
            u.set_requires_gradient_sync(self.sync, recurse=False)

    def __exit__(self, *exc):
        for u in self.units:
            u.set_requires_gradient_sync(True, recurse=False)
        return False


def load_state_file(ckpt_dir: Path) -> dict:
    """``state.pt`` of a checkpoint, read with ``weights_only=True`` (no code runs from the file)."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or an old checkpoint with pickled objects: say which
        raise StageError(f"cannot read checkpoint {path}: {e}") from None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in the backward (transformers' checkpointing, non-reentrant:
    works with FSDP2 and with frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_engine(cfg: RunConfig, accelerator) -> Engine:
    """The engine of a stage: checks the launcher's precision, turns TF32 matmuls on (CUDA), and
    builds the device mesh when models are to be wrapped (``parallel.sharding=fsdp2``, or N > 1)."""
    pc = cfg.parallel
    launcher_mixed_precision(pc)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[cfg.model.dtype]
    frozen = DTYPES[cfg.model.frozen_dtype or cfg.model.dtype]
    n, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    mesh = None
    if pc.sharding == "fsdp2" or n > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():  # one process without a launcher: a world of one
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(),
                                    world_size=1, rank=0)
        if pc.sharding == "fsdp2":
            mesh = init_device_mesh(device.type, (n,), mesh_dim_names=("shard",))
        else:  # plain data parallel through FSDP2: replicate over n, shards of one (see the module docstring)
            mesh = init_device_mesh(device.type, (n, 1), mesh_dim_names=("replicate", "shard"))
    return Engine(pc, dtype, frozen, n, rank, device, mesh)
