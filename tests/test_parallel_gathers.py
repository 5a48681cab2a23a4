"""How many all-gathers one DMD2 step does per sharded unit (docs/DESIGN.md, "Several
processes"): counted on FSDP2's own unshard in a one-process gloo group. The units inside a
UNet's blocks: each resnet, each transformer block, each attention's and block's remainder."""
import pytest
import torch.distributed as dist
from conftest import tiny_recipe
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from diffusion_distill.build import setup_run
from diffusion_distill.parallel import ShardedRun, shard_units
from diffusion_distill.recipe import load_recipe
from diffusion_distill.step import build_optimizers, train_step

# student step: student forward (graph) + teacher CFG (one batched pass) + critic score
# (no graph) + the student's backward; critic loss: the critic's forward (graph) + backward.
# critic-only step: the student's sample (no graph) + the critic's forward and backward.
GATHERS_PER_BLOCK = {"student step": 6, "critic-only step": 3}


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_all_gathers_per_block_of_one_dmd2_step(tiny_sd_path, tmp_path, one_process_group,
                                                monkeypatch):
    recipe = load_recipe(tiny_recipe(tiny_sd_path, tmp_path / "run",
                                     method={"name": "dmd2", "critic_steps": 5}))
    _, objective, nets = setup_run(recipe, "cpu")
    sharded = ShardedRun(nets, "fsdp", 1, "cpu")
    optimizers = build_optimizers(objective, nets, recipe["train"])
    blocks = shard_units(nets.roles.backbone)
    # every resnet and transformer block is a unit of its own (not its whole down/up block)
    for name, m in nets.roles.backbone.named_modules():
        if name.split(".")[-2:-1] in (["resnets"], ["transformer_blocks"]):
            assert m._get_fsdp_state()._fsdp_param_group is not None, name
    index = {id(b._get_fsdp_state()._fsdp_param_group): i for i, b in enumerate(blocks)}
    counts = [0] * len(blocks)
    original = _fsdp_param_group.FSDPParamGroup.unshard

    def counting(group, *args, **kwargs):
        # what FSDP2 all-gathers: a group not already gathered (at one process it then
        # skips the collective itself; at N it is one all-gather of the block)
        i = index.get(id(group))
        if i is not None and group._all_gather_result is None and not group.is_unsharded:
            counts[i] += 1
        return original(group, *args, **kwargs)

    monkeypatch.setattr(_fsdp_param_group.FSDPParamGroup, "unshard", counting)
    prompts = {"prompts": ["a red circle", "a blue square"]}
    teacher = nets.teacher_model

    def batches(rng, n):
        return {"prompts": prompts["prompts"][:n], "cond": teacher.prompts(prompts["prompts"][:n])}

    for step, what in ((0, "student step"), (1, "critic-only step")):
        counts[:] = [0] * len(blocks)
        train_step(objective, nets, optimizers, batches, step, recipe["train"], 2,
                   accelerator=sharded)
        assert all(c > 0 for c in counts)
        assert set(counts) == {GATHERS_PER_BLOCK[what]}, (what, counts)
