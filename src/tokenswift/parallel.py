"""Tensor parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs).

Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1) every process loads the model and keeps its
share: query and KV heads, and MLP columns, split in N contiguous slices; the attention output
and MLP down projections are then partial sums, all-reduced before their bias. Embedding, norms
and LM head stay whole on every rank, so after each all-reduce every rank holds the same residual
stream and the same logits (the reduced tensor is the same bits on every rank). The KV cache is
sharded by KV head for free: each rank's decoder has 1/N of the KV heads.

Every rank runs the same loop. Wherever the loop decides something from measurements or
samples, rank 0's decision is broadcast (`TensorParallel.agree`): the plan (it is chosen from
timings, which differ per rank), the drafter's proposal and the walk's result. So every rank
verifies the same trie and commits the same tokens.

Library use is SPMD: each rank calls `generate` alike. The CLI instead leads from rank 0
(`lead`): ranks > 0 `follow`, running exactly the step generators rank 0 runs, so `generate`
prints and `serve` listens on rank 0 only.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from .config import ModelConfig

log = logging.getLogger("tokenswift")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


@dataclass
class TensorParallel:
    rank: int
    world: int
    device: torch.device  # where this rank's weights live (collectives need it for NCCL)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place."""
        import torch.distributed as dist

        dist.all_reduce(x)
        return x

    def agree(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable value)."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def init_from_env(device: torch.device | None) -> TensorParallel | None:
    """The process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), or
    None in a single process. On CUDA each rank takes the GPU of its LOCAL_RANK."""
    n = world_size()
    if n <= 1:
        return None
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = device if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible; "
                             f"run at most {torch.cuda.device_count()} processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        # a process group still alive when the interpreter exits aborts it ("terminate called
        # without an active exception"): tear ours down first
        atexit.register(_destroy)
    if dist.get_world_size() != n:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {n}")
    return TensorParallel(rank=dist.get_rank(), world=n, device=dev)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        # every rank past its last collective first: tearing down while a peer's transfer is still
        # in flight aborts the process the same way
        dist.barrier()
        dist.destroy_process_group()


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """One rank's share of the model: 1/N of the query heads, KV heads and MLP width."""
    K, H, I = cfg.num_kv_heads, cfg.num_heads, cfg.intermediate_size
    if K % world:
        raise ValueError(f"tensor parallel over {world} processes needs the model's {K} KV heads to divide "
                         f"evenly; use a process count that divides {K} (--nproc-per-node)")
    if I % world:
        raise ValueError(f"tensor parallel over {world} processes needs the MLP width {I} to divide evenly; "
                         f"use a process count that divides {I} (--nproc-per-node)")
    return dataclasses.replace(cfg, num_heads=H // world, num_kv_heads=K // world, intermediate_size=I // world)


def shard_tensors(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, rank: int,
                  world: int) -> dict[str, torch.Tensor]:
    """HF-named full tensors -> this rank's slices (for a decoder of `shard_config(cfg, world)`).
    Output projections keep their bias whole: it is added once, after the all-reduce."""
    Dh = cfg.head_dim
    Hl, Kl, Il = cfg.num_heads // world, cfg.num_kv_heads // world, cfg.intermediate_size // world
    rows = {"q_proj": Hl * Dh, "k_proj": Kl * Dh, "v_proj": Kl * Dh, "gate_proj": Il, "up_proj": Il}
    cols = {"o_proj": Hl * Dh, "down_proj": Il}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        proj = parts[-2] if len(parts) >= 2 else ""
        if proj in rows:  # weight [out, in] and bias [out]: this rank's output rows
            n = rows[proj]
            out[name] = t[rank * n : (rank + 1) * n].contiguous()
        elif proj in cols and parts[-1] == "weight":  # [out, in]: this rank's input columns
            n = cols[proj]
            out[name] = t[:, rank * n : (rank + 1) * n].contiguous()
        else:
            out[name] = t
    return out


# -- the CLI's leader / followers ------------------------------------------------------------------


def mirrored(tp: TensorParallel, call: dict[str, Any], steps: Iterator[Any]) -> Iterator[Any]:
    """Rank 0's step generator, announcing each start / next / close to the followers first so
    they run the same collectives in the same order."""
    tp.agree(("start", call))
    try:
        while True:
            tp.agree(("next", None))
            try:
                step = next(steps)
            except StopIteration:
                return
            yield step
    except GeneratorExit:  # left early between steps (a stop string, a cancelled request): so do they
        tp.agree(("close", None))
        raise
    finally:  # an error inside a step leaves the ranks apart: the process exits, torchrun stops them
        steps.close()


def follow(tp: TensorParallel, start: Callable[[dict[str, Any]], Iterator[Any]]) -> None:
    """Ranks > 0 under the CLI: run what rank 0 announces until it says stop. Ctrl-C is rank 0's
    to handle (it stops them, or exits and torchrun stops them), so it is ignored here."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    steps: Iterator[Any] | None = None
    while True:
        kind, arg = tp.agree(None)
        if kind == "stop":
            return
        if kind == "start":
            steps = start(arg)
        elif kind == "next":
            try:
                next(steps)
            except StopIteration:
                steps = None
        elif kind == "close" and steps is not None:
            steps.close()
            steps = None


def stop_followers(tp: TensorParallel | None) -> None:
    if tp is not None and tp.rank == 0:
        tp.agree(("stop", None))
