"""Checkpoints under FSDP2: the Trainer gathers sharded weights, optimizer and EMA states into one
full state dict that loads anywhere, and a run resumed from it under FSDP continues exactly. Two CPU
processes with gloo (torchrun), running tests/fsdp_worker.py."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from models.flow import Flow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), WORKER, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_fsdp_checkpoints_are_full_and_resume_exactly(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    torchrun(straight, "4")
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "flow_2.pt"), resumed)
    out = torchrun(resumed, "4", "--resume_from", "latest")
    assert "resumed from" in out.stderr + out.stdout
    a, b = (common.load_checkpoint(os.path.join(d, "flow_4.pt"), "flow") for d in (straight, resumed))
    assert a["num_processes"] == 2
    for key in a["model"]:
        assert type(a["model"][key]) is torch.Tensor  # gathered: no DTensor shards in the file
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    # loads in one plain process, every tensor at its full shape
    flow = Flow(dict(seq_len=4, dim=8, width=16, depth=2, heads=2), *[torch.zeros(4, 8), torch.ones(4, 8)] * 2)
    flow.load_state_dict(a["model"])
    early = common.load_checkpoint(os.path.join(straight, "flow_2.pt"), "flow")["model"]
    assert any(not torch.equal(a["model"][k], early[k]) for k in early)  # it trained between the two


def test_shipped_accelerate_configs_load():
    import glob

    from accelerate.commands.config.config_args import load_config_from_file
    from transformers.models.qwen2 import modeling_qwen2
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate")
    configs = {os.path.basename(f): load_config_from_file(f) for f in glob.glob(os.path.join(root, "*.yaml"))}
    assert set(configs) == {"single_gpu.yaml", "ddp_8gpu.yaml", "fsdp_8gpu.yaml", "deepspeed_zero2.yaml"}
    assert [configs[n].num_processes for n in sorted(configs)] == [8, 8, 8, 1]
    fsdp = configs["fsdp_8gpu.yaml"].fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert hasattr(modeling_qwen2, fsdp["fsdp_transformer_layer_cls_to_wrap"])  # the class accelerate wraps
