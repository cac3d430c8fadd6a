"""A training loop with ``zdcp.CheckpointManager``: killed mid-run, resumed at another world size.

An FSDP2 model with Adam trains on deterministic data (step ``s``'s global batch comes from a
generator seeded with ``s``, split across the ranks), in float64. The manager saves every 2
steps in the background, keeps the newest 2 checkpoints and every 4th step, and saves at once
on SIGTERM. The program runs the loop three times:

1. on 2 ranks, uninterrupted, for the reference losses;
2. on 2 ranks, killed with SIGKILL (every rank, at once) while a save is in flight;
3. on 3 ranks, resuming from the newest committed step, to the end,

and checks that the resumed run's losses equal the uninterrupted run's, step for step (up to
the rounding of gradient reductions over 2 or 3 ranks, 1e-9 relative at most).

    python examples/train_loop.py                 # ./checkpoints/train_loop/
    python examples/train_loop.py --steps 40 --kill-at 24 --dir /tmp/ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from tutorial import AppState, ToyModel, finish, run

import zdcp

GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks


def batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of step ``step``'s global batch: the same data whatever the world size."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    return x[rows], y[rows]


def worker(rank: int, world_size: int, rendezvous: str, directory: str, steps: int, kill_at: int | None,
           log: str) -> None:  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # the same initial model on every rank and at every world size
    model = ToyModel().double()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    state = {"app": AppState(model, optimizer)}
    manager = zdcp.CheckpointManager(
        directory,
        save_interval_steps=2,
        max_to_keep=2,
        keep_every_n_steps=4,
        async_save=True,
        preemption_signals=(signal.SIGTERM,),
        layout="packed",
    )
    start = (manager.restore(state) or 0) + 1
    losses = {}
    for step in range(start, steps + 1):
        x, y = batch(step, rank, world_size)
        # FSDP averages gradients over ranks: the mean over this rank's rows makes it the mean
        # over the global batch.
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach() * x.shape[0]
        dist.all_reduce(total)
        losses[step] = total.item() / GLOBAL_BATCH
        manager.save(step, state, metrics={"loss": losses[step]})
        if step == kill_at:  # with a save in flight (async, when kill_at is a multiple of 2): all die at once
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        if manager.reached_preemption(step):
            break
    manager.close()
    if rank == 0:
        with open(log, "w") as f:
            json.dump({"start": start, "losses": losses, "kept": manager.all_steps()}, f)
    finish()


def train(world_size: int, directory: str, steps: int, kill_at: int | None, log: str) -> bool:
    """Run the loop on ``world_size`` ranks; False if it was killed."""
    try:
        run(worker, world_size, directory, steps, kill_at, log)
    except mp.ProcessExitedException as e:
        if e.exit_code != -signal.SIGKILL:
            raise
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="checkpoints", help="where checkpoints go (default: ./checkpoints)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kill-at", type=int, default=12)
    args = parser.parse_args()
    root = os.path.abspath(os.path.join(args.dir, "train_loop"))
    shutil.rmtree(root, ignore_errors=True)  # a rerun starts over
    os.makedirs(root)
    reference, interrupted, resumed = (os.path.join(root, name) for name in ("reference", "interrupted", "resumed"))

    train(2, reference, args.steps, None, reference + ".json")
    with open(reference + ".json") as f:
        expected = {int(step): loss for step, loss in json.load(f)["losses"].items()}
    print(f"2 ranks, uninterrupted: {args.steps} steps, final loss {expected[args.steps]:.6f}")

    assert not train(2, interrupted, args.steps, args.kill_at, interrupted + ".json")
    print(f"2 ranks, killed with SIGKILL at step {args.kill_at}, a save in flight")

    train(3, interrupted, args.steps, None, resumed + ".json")
    with open(resumed + ".json") as f:
        found = json.load(f)
    losses = {int(step): loss for step, loss in found["losses"].items()}
    worst = max(abs(loss - expected[step]) / abs(expected[step]) for step, loss in losses.items())
    assert list(losses) == list(range(found["start"], args.steps + 1)), losses
    assert worst <= 1e-9, f"the resumed run's losses differ from the uninterrupted run's by {worst:.1e}"
    print(f"3 ranks, resumed at step {found['start']}: losses equal the uninterrupted run's for every step "
          f"(largest relative difference {worst:.1e}); checkpoints kept: steps {found['kept']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
