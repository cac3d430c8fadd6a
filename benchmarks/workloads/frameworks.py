"""``frameworks``: checkpoints as the frameworks take them, through DCP's own calls. An FSDP2
model + Adam state (as ``sharded4``) on 4 gloo ranks is saved again and again to one path with
``dcp.save(state, checkpoint_id=path)``, the path made first and a ``meta.pt`` written into it
after each save (Lightning's ``last.ckpt``), and loaded with ``dcp.load(checkpoint_id=path)``:
once with DCP's own ``FileSystemWriter``/``Reader``, once under ``zdcp.as_dcp_backend()``
(the default layout; DCP's planner, as frameworks use it). A save under the switch replaces
the checkpoint atomically and keeps ``meta.pt``; DCP's writes its files over the old ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import zdcp
from zdcp.testing import run_ranks

from ..common import (
    DCP,
    FSDP_MODEL,
    FSDP_MODEL_QUICK,
    ZDCP_PACKED,
    FsdpModel,
    collective_timed,
    fsdp_state,
    interleaved,
)
from ..registry import Settings
from ..tables import TimedOp, timing_table

WORLD_SIZE = 4


def _save_like_lightning(rank: int, state: dict, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)  # as Lightning does before its save
    dcp.save(state, checkpoint_id=path)
    if rank == 0:
        torch.save({"global_step": 1, "loops": {}}, path / "meta.pt")


def _on_rank(rank: int, world_size: int, directory: Path, rounds: int, model: FsdpModel, out: Path) -> None:
    state = fsdp_state(world_size, 0, model)
    paths = {DCP: directory / DCP / "last.ckpt", ZDCP_PACKED: directory / ZDCP_PACKED / "last.ckpt"}

    def under(impl, fn):
        if impl == DCP:
            return fn()
        with zdcp.as_dcp_backend():
            return fn()

    def save(impl: str) -> float:
        return under(impl, lambda: collective_timed(lambda: _save_like_lightning(rank, state, paths[impl])))

    def load(impl: str) -> float:
        return under(impl, lambda: collective_timed(lambda: dcp.load(state, checkpoint_id=paths[impl])))

    for impl in paths:  # the first save to the path creates it; the rounds save over it
        save(impl)
    saves = interleaved(rounds, {impl: (lambda impl=impl: save(impl)) for impl in paths})
    loads = interleaved(rounds, {impl: (lambda impl=impl: load(impl)) for impl in paths})
    dist.barrier()
    if rank == 0:
        zdcp_names = sorted(p.name for p in paths[ZDCP_PACKED].iterdir())
        assert "meta.pt" in zdcp_names and zdcp.verify(paths[ZDCP_PACKED]).foreign == ["meta.pt"], zdcp_names
        torch.save({"saves": saves, "loads": loads}, out)


def frameworks(settings: Settings) -> str:
    model = settings.sized(FSDP_MODEL, FSDP_MODEL_QUICK)
    out = settings.directory / "times.pt"
    run_ranks(WORLD_SIZE, _on_rank, settings.directory, settings.rounds, model, out, timeout=1800)
    result = torch.load(out)
    ops = [
        TimedOp(f"save over last.ckpt at {WORLD_SIZE}", result["saves"]),
        TimedOp(f"load at {WORLD_SIZE}", result["loads"]),
    ]
    described = (
        f"FSDP2 + Adam, {model.arrays} arrays, 4 ranks, `dcp.save`/`dcp.load(checkpoint_id=...)`; "
        "zdcp packed = under `zdcp.as_dcp_backend()`; time = the slowest rank's."
    )
    return f"{described}\n\n{timing_table(ops)}"
