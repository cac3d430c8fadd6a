"""zdcp under the frameworks, through ``zdcp.as_dcp_backend()``, on CPU with 2 gloo ranks:
Lightning's ``ModelParallelStrategy`` (FSDP2; Trainer with ``ModelCheckpoint`` resuming from
``last.ckpt``, and Fabric), Accelerate's FSDP2 ``save_state``/``load_state``, and the HF
Trainer resuming. Each checks that what the framework wrote is zdcp (no ``.distcp``), that
``zdcp.verify`` passes (the framework's own files beside it listed as foreign), and that the
model and optimizer state after the resume equal the state saved, exactly.

The frameworks need a few things on CPU, none of them in zdcp (docs/integrations.md lists them):
Lightning must not launch processes (``TorchElasticEnvironment``, since ``run_ranks`` made
them), and Accelerate enables FSDP only for accelerator devices, so the tests switch its state
to FSDP after it chose ``MULTI_CPU``.
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

import zdcp
from zdcp.testing import run_ranks

# -- what every test checks ----------------------------------------------------------------------


def _full_state(model, optimizer):
    """The full model and optimizer state (collective; with ``cpu_offload`` rank 0's alone)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def _first_difference(got, expected, where=""):
    """Where ``got`` and ``expected`` first differ (tensors bit for bit), or None."""
    if isinstance(expected, dict):
        if not isinstance(got, dict) or got.keys() != expected.keys():
            return f"{where or '<root>'}: keys {sorted(map(str, got))} != {sorted(map(str, expected))}"
        return next((d for k in expected if (d := _first_difference(got[k], expected[k], f"{where}/{k}"))), None)
    if isinstance(expected, list | tuple):
        if len(got) != len(expected):
            return f"{where}: {len(got)} items != {len(expected)}"
        return next((d for i, e in enumerate(expected) if (d := _first_difference(got[i], e, f"{where}[{i}]"))), None)
    if isinstance(expected, torch.Tensor):
        same = isinstance(got, torch.Tensor) and got.dtype == expected.dtype and got.shape == expected.shape
        return None if same and torch.equal(got, expected) else f"{where}: tensors differ"
    return None if got == expected else f"{where}: {got!r} != {expected!r}"


def _assert_same_on_every_rank(rank, got, expected_path, *, before=None):
    """Rank 0 compares ``got`` with the state saved at ``expected_path`` (and checks that the
    fresh state ``before`` the load differed from it); every rank raises its verdict."""
    verdict = [None]
    if rank == 0:
        expected = torch.load(expected_path, weights_only=False)
        if before is not None and _first_difference(before["model"], expected["model"]) is None:
            verdict[0] = "the fresh model equals the saved one: the load would prove nothing"
        else:
            verdict[0] = _first_difference(got, expected)
        assert expected["optimizer"]["state"], "no optimizer state was saved"
    dist.broadcast_object_list(verdict, src=0)
    assert verdict[0] is None, verdict[0]


def _assert_zdcp(root, checkpoints, foreign):
    """Nothing under ``root`` is DCP's; each of ``checkpoints`` verifies, with ``foreign``
    beside it."""
    dcp_files = [p for p in Path(root).rglob("*") if p.name == ".metadata" or p.suffix == ".distcp"]
    assert not dcp_files, dcp_files
    for path in checkpoints:
        report = zdcp.verify(path)
        assert report.ok and report.foreign == foreign, (path, report.faults, report.foreign)


def _environment(rank, world_size):
    """What the frameworks read to join the run ``run_ranks`` made (its gloo group exists)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),  # else Accelerate takes the run for several nodes
        MASTER_ADDR="127.0.0.1",  # read, unused: the group exists
        MASTER_PORT="29500",
        OMP_NUM_THREADS="1",  # else Accelerate resets the thread count run_ranks set
    )
    zdcp.as_dcp_backend()


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))  # 3 rows: uneven


def _batches(rank, count):
    generator = torch.Generator().manual_seed(rank)
    return [(torch.randn(4, 10, generator=generator), torch.randn(4, 3, generator=generator)) for _ in range(count)]


# -- Lightning: ModelParallelStrategy, Trainer and Fabric -------------------------------------------

STEPS = 3


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])


def _lightning_module(seed):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(seed)

        def configure_model(self):
            _shard(self.net, self.device_mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def train_dataloader(self):  # Lightning shards it over the ranks
            generator = torch.Generator().manual_seed(7)
            data = torch.utils.data.TensorDataset(torch.randn(32, 10, generator=generator), torch.randn(32, 3))
            return torch.utils.data.DataLoader(data, batch_size=4)

    return Tiny()


def _trainer(root, callbacks):
    import lightning.pytorch as pl
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.strategies import ModelParallelStrategy

    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        plugins=[TorchElasticEnvironment()],  # the processes exist: no launcher
        max_steps=STEPS,
        callbacks=callbacks,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def _fabric():
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.fabric.strategies import ModelParallelStrategy

    fabric = Fabric(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(_shard, data_parallel_size=2, tensor_parallel_size=1),
        plugins=[TorchElasticEnvironment()],
    )
    fabric.launch()
    return fabric


def _fabric_training(fabric, seed, steps):
    model = fabric.setup_module(_mlp(seed))
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-2))
    for x, y in _batches(fabric.global_rank, steps):
        optimizer.zero_grad()
        fabric.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()
    return model, optimizer


def _lightning_save(rank, world_size, root):
    _environment(rank, world_size)
    from lightning.pytorch.callbacks import ModelCheckpoint

    # The Trainer saves last.ckpt at every step: the same directory, saved over twice.
    module = _lightning_module(seed=0)
    trainer = _trainer(root, [ModelCheckpoint(dirpath=f"{root}/ckpts", save_last=True, every_n_train_steps=1)])
    trainer.fit(module)
    state = _full_state(module.net, trainer.optimizers[0])
    fabric = _fabric()
    model, optimizer = _fabric_training(fabric, seed=0, steps=2)
    fabric.save(f"{root}/fabric.ckpt", {"model": model, "optimizer": optimizer, "step": 7})
    fabric_state = _full_state(model.module, optimizer.optimizer)
    if rank == 0:
        torch.save(state, f"{root}/trainer.pt")
        torch.save(fabric_state, f"{root}/fabric.pt")


def _lightning_resume(rank, world_size, root):
    _environment(rank, world_size)
    import lightning.pytorch as pl

    seen = {}

    class Before(pl.Callback):
        def on_fit_start(self, trainer, pl_module):  # set up, not yet restored
            seen["state"] = _full_state(pl_module.net, trainer.optimizers[0])

        def on_train_batch_start(self, *args):
            seen["trained"] = True

    module = _lightning_module(seed=1)
    trainer = _trainer(root, [Before()])
    trainer.fit(module, ckpt_path=f"{root}/ckpts/last.ckpt")  # max_steps reached: restores, trains no step
    assert trainer.global_step == STEPS and "trained" not in seen
    got = _full_state(module.net, trainer.optimizers[0])
    _assert_same_on_every_rank(rank, got, f"{root}/trainer.pt", before=seen["state"])

    fabric = _fabric()
    model, optimizer = _fabric_training(fabric, seed=1, steps=3)  # optimizer state of other values
    before = _full_state(model.module, optimizer.optimizer)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(f"{root}/fabric.ckpt", state) == {} and state["step"] == 7
    got = _full_state(model.module, optimizer.optimizer)
    _assert_same_on_every_rank(rank, got, f"{root}/fabric.pt", before=before)


def test_lightning_trainer_and_fabric_save_zdcp_and_resume_exactly(tmp_path):
    run_ranks(2, _lightning_save, str(tmp_path), timeout=300)
    checkpoints = [tmp_path / "ckpts" / "last.ckpt", tmp_path / "ckpts" / f"epoch=0-step={STEPS}.ckpt"]
    _assert_zdcp(tmp_path, [*checkpoints, tmp_path / "fabric.ckpt"], foreign=["meta.pt"])
    run_ranks(2, _lightning_resume, str(tmp_path), timeout=300)


# -- Accelerate: FSDP2 save_state / load_state, merge_fsdp_weights ---------------------------------


def _accelerator():
    """An Accelerator with an FSDP2 plugin (sharded state dicts) on the CPU run."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    if accelerator.state.distributed_type == DistributedType.MULTI_CPU:  # FSDP is for accelerators only
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert accelerator.is_fsdp2
    return accelerator


def _accelerate_training(seed):
    accelerator = _accelerator()
    model = _mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return accelerator, *accelerator.prepare(model, optimizer, scheduler)


def _accelerate_step(accelerator, model, optimizer, scheduler, x, y):
    accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _accelerate_save(rank, world_size, root):
    _environment(rank, world_size)
    accelerator, model, optimizer, scheduler = _accelerate_training(seed=0)
    for i, (x, y) in enumerate(_batches(rank, 3)):
        _accelerate_step(accelerator, model, optimizer, scheduler, x, y)
        if i > 0:
            accelerator.save_state(f"{root}/state")  # the second save replaces the first
    state = {**_full_state(model, optimizer.optimizer), "scheduler": scheduler.state_dict()}
    if rank == 0:
        torch.save(state, f"{root}/expected.pt")


def _accelerate_load(rank, world_size, root):
    _environment(rank, world_size)
    accelerator, model, optimizer, scheduler = _accelerate_training(seed=1)
    before = _full_state(model, optimizer.optimizer)
    accelerator.load_state(f"{root}/state")
    got = {**_full_state(model, optimizer.optimizer), "scheduler": scheduler.state_dict()}
    _assert_same_on_every_rank(rank, got, f"{root}/expected.pt", before=before)


def test_accelerate_fsdp2_save_state_and_load_state_are_zdcp_and_exact(tmp_path):
    from accelerate.state import AcceleratorState
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    run_ranks(2, _accelerate_save, str(tmp_path), timeout=300)
    state = tmp_path / "state"
    _assert_zdcp(tmp_path, [state / "pytorch_model_fsdp_0", state / "optimizer_0"], foreign=[])
    assert sorted(p.name for p in state.iterdir() if p.is_file()) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
        "scheduler.bin",
    ]
    run_ranks(2, _accelerate_load, str(tmp_path), timeout=300)
    try:  # one process, no process group: the weights merged from the zdcp checkpoint
        with zdcp.as_dcp_backend():
            merge_fsdp_weights(str(state / "pytorch_model_fsdp_0"), str(tmp_path / "merged"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert _first_difference(merged, torch.load(tmp_path / "expected.pt")["model"]) is None


# -- the HF Trainer: FSDP2 checkpoints, resumed ----------------------------------------------------


def _hf_trainer(root, callbacks=()):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=f"{root}/out",
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        fsdp=True,
        fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT"},
        disable_tqdm=True,
    )

    class CpuFsdpTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            arguments._setup_devices  # Accelerate's state: MULTI_CPU, on which it would ignore FSDP
            if PartialState._shared_state.get("distributed_type") == DistributedType.MULTI_CPU:
                PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
            super().create_accelerator_and_postprocess()

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (32, 16))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    return CpuFsdpTrainer(model=LlamaForCausalLM(config), args=arguments, train_dataset=data, callbacks=list(callbacks))


def _hf_save(rank, world_size, root):
    _environment(rank, world_size)
    trainer = _hf_trainer(root)
    trainer.train()
    assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
    state = _full_state(trainer.model_wrapped, trainer.optimizer.optimizer)
    if rank == 0:
        torch.save(state, f"{root}/expected.pt")


class _Resumed(Exception):
    """Ends ``train()`` once the resumed state is captured (resuming at max_steps would still
    train one step)."""


def _hf_resume(rank, world_size, root):
    _environment(rank, world_size)
    from transformers import TrainerCallback

    resumed = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            resumed["step"] = state.global_step
            resumed["state"] = _full_state(model, optimizer.optimizer)
            raise _Resumed

    trainer = _hf_trainer(root, [Capture()])
    try:
        trainer.train(resume_from_checkpoint=f"{root}/out/checkpoint-4")
    except _Resumed:
        pass
    assert resumed["step"] == 4
    _assert_same_on_every_rank(rank, resumed["state"], f"{root}/expected.pt")


def test_the_hf_trainer_saves_zdcp_and_resumes_exactly(tmp_path):
    run_ranks(2, _hf_save, str(tmp_path), timeout=300)
    step = tmp_path / "out" / "checkpoint-4"
    checkpoints = [step / "pytorch_model_fsdp_0", step / "optimizer_0", step.with_name("checkpoint-2") / "optimizer_0"]
    _assert_zdcp(tmp_path, checkpoints, foreign=[])
    assert {"trainer_state.json", "rng_state_0.pth", "scheduler.pt"} <= {p.name for p in step.iterdir()}
    run_ranks(2, _hf_resume, str(tmp_path), timeout=300)
