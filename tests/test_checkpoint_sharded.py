"""Checkpoints of several processes (torch.distributed.checkpoint): each process writes its own
shard file, the checkpoint reads back whole at one process and resharded at two, and one that
is half-written (a shard missing, the temporary folder of a killed save) is never resumed
from. Two real processes (gloo on CPU, torch.multiprocessing), a tiny FSDP2-sharded network:
the checkpoint code is the one training uses, without a training run's start-up cost."""
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_distill import checkpoint as ck


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5))  # rows 8 and 5: uneven shards


class _Nets:
    """The part of ``Nets`` a checkpoint touches: one role's state dict."""

    def __init__(self, net):
        self.net = net

    def state_dict(self, role):
        return self.net.state_dict()

    def load_state_dict(self, role, state):
        self.net.load_state_dict(state)


def _trained(net, sharded: bool):
    """Two AdamW steps on a fixed batch: optimizer state (exp_avg, step) to save."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        net(x[rank * 4 // world:(rank + 1) * 4 // world]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _sharded_net():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = _net()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in net:
        fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _worker(rank, world, store, run_dir, job):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        net = _sharded_net()
        if job == "save":
            opt = _trained(net, sharded=True)
            ck.save_checkpoint(run_dir, 2, {"student": net.state_dict()}, {"student": opt},
                               {"name": "x"})
            full = {k: v.full_tensor() for k, v in net.state_dict().items()}  # the reference
            exp_avg = {str(i): s["exp_avg"].full_tensor()
                       for i, s in opt.state_dict()["state"].items()}
            if rank == 0:
                save_file(full, os.path.join(run_dir, "reference.safetensors"))
                save_file(exp_avg, os.path.join(run_dir, "exp_avg.safetensors"))
        else:  # load a checkpoint into the sharded network, as a resumed run does
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
            opened = ck.find_latest_good(run_dir, ["student"], ["student"])
            ck.load_into(opened, _Nets(net), {"student": opt}, ["student"], run_dir,
                         collective=True)
            full = {k: v.full_tensor() for k, v in net.state_dict().items()}
            exp_avg = {str(i): s["exp_avg"].full_tensor()
                       for i, s in opt.state_dict()["state"].items()}
            save_file(full, os.path.join(run_dir, f"loaded{rank}.safetensors"))
            save_file(exp_avg, os.path.join(run_dir, f"loaded_exp_avg{rank}.safetensors"))
        # both done before either tears gloo down: a process that destroys the group while its
        # peer still writes can abort the peer ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, run_dir, job):
    import torch.multiprocessing as mp

    store = tmp_path / f"store_{job}"
    mp.spawn(_worker, args=(2, str(store), str(run_dir), job), nprocs=2, join=True)


@pytest.fixture(scope="module")
def two_process_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    _spawn(tmp, tmp / "run", "save")
    return tmp / "run"


def test_two_processes_write_one_shard_each_and_it_reads_back_whole(two_process_checkpoint,
                                                                    tmp_path):
    """Catches: rank 0 gathering and writing everything (one file, no sharding header), a
    shard written twice or not at all, a one-process load that reads only rank 0's rows."""
    run = str(two_process_checkpoint)
    path = ck.latest_checkpoint(run)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) == 2 and all(f.startswith("shard-") for f in files), files
    for f in files:  # each holds a slice of every weight, placed by DCP's header
        with safe_open(os.path.join(path, f), framework="pt") as st:
            assert "DCP_SHARDING_INFO" in st.metadata()
            assert st.get_slice("student/0.weight").get_shape()[0] == 4  # 8 rows over 2
    weights, optim, state = ck.load_checkpoint(path)  # one process, no process group
    reference = load_file(os.path.join(run, "reference.safetensors"))
    assert state["step"] == 2 and state["processes"] == 2
    for k, v in reference.items():
        torch.testing.assert_close(weights["student"][k], v, rtol=0, atol=0)
    exp_avg = load_file(os.path.join(run, "exp_avg.safetensors"))
    for i, s in optim["student"]["state"].items():
        torch.testing.assert_close(s["exp_avg"], exp_avg[str(i)], rtol=0, atol=0)
        assert s["step"].item() == 2
    # and it resumes one process: the optimizer state loads into a plain AdamW
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ck.load_into(ck.find_latest_good(run, ["student"], ["student"]), _Nets(net),
                 {"student": opt}, ["student"], run)
    for k, v in reference.items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


def test_a_one_process_checkpoint_loads_resharded_into_two(tmp_path):
    """Catches: each rank loading the whole tensor into its shard (a size error) or the
    wrong rows (rank 1 given rank 0's)."""
    net = _net()
    opt = _trained(net, sharded=False)
    run = tmp_path / "run"
    ck.save_checkpoint(str(run), 2, {"student": net.state_dict()}, {"student": opt}, {})
    _spawn(tmp_path, run, "load")
    for rank in (0, 1):
        loaded = load_file(str(run / f"loaded{rank}.safetensors"))
        for k, v in net.state_dict().items():
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
        exp_avg = load_file(str(run / f"loaded_exp_avg{rank}.safetensors"))
        for i, s in opt.state_dict()["state"].items():
            torch.testing.assert_close(exp_avg[str(i)], s["exp_avg"], rtol=0, atol=0)


def test_a_half_written_sharded_checkpoint_is_never_resumed_from(two_process_checkpoint,
                                                                  tmp_path, capsys):
    """A newer checkpoint with one shard file gone, and the temporary folder a killed save
    leaves: the run resumes from the complete one. Catches: a load that trusts whatever
    files are there (DCP alone reads a missing shard's rows as never written), a temporary
    folder taken for a checkpoint, temporary folders left to pile up."""
    run = tmp_path / "run"
    shutil.copytree(two_process_checkpoint / "checkpoints", run / "checkpoints")
    good = ck.latest_checkpoint(str(run))
    partial = run / "checkpoints" / "step_0000004"
    shutil.copytree(good, partial)
    os.remove(partial / sorted(f for f in os.listdir(partial) if f.startswith("shard-"))[1])
    shutil.copytree(good, run / "checkpoints" / ".tmp_step_0000006")  # a killed save's
    assert [s for s, _ in ck.list_checkpoints(str(run))] == [2, 4]
    opened = ck.find_latest_good(str(run), ["student"], ["student"])
    assert opened.path == good and opened.state["step"] == 2
    assert "shard-00002" in capsys.readouterr().err  # the missing file is named
    # even with the file list edited to match what is left: a tensor only partly there
    state = json.loads((partial / "state.json").read_text())
    state["files"] = [f for f in state["files"] if os.path.exists(partial / f)]
    (partial / "state.json").write_text(json.dumps(state))
    with pytest.raises(ck.CheckpointError, match=r"only partly or not at all: a shard file is"):
        ck.open_checkpoint(str(partial))
    # the next save clears what the killed one left
    ck.save_checkpoint(str(run), 8, {"student": _net().state_dict()}, {}, {})
    assert not (run / "checkpoints" / ".tmp_step_0000006").exists()
