"""The model, data and per-rank worker of tests/test_torch_ddp.py (a module of its own so
that torch.multiprocessing.spawn's fresh interpreters can import it)."""

import os

import torch
import torch.nn.functional as F
from torch import nn

import cuconv.torch as ct


class Model(nn.Module):
    """Every kind of cuconv layer with parameters, float64; eval mode keeps the two
    BatchNorms per-sample (running statistics), so a split batch sees the same function."""

    def __init__(self):
        super().__init__()
        self.stem = ct.Conv2d(3, 8, 3, padding=1)
        self.deform = ct.DeformConv2d(8, 8, 3, padding=1)
        self.involution = ct.Involution2d(8, 3, group_channels=4)
        self.odconv = ct.ODConv2d(8, 8, 3, padding=1, min_channel=4)
        self.dynamic = ct.DynamicConv2d(8, 8, 3, padding=1, num_experts=2, temperature=1.0)
        self.aff = ct.AdaptiveFrequencyFilter(8, num_blocks=2)
        self.up = ct.SubPixelConv2d(8, 2, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = y + self.odconv(F.relu(self.involution(F.relu(self.deform(y)))))
        return self.up(self.aff(self.dynamic(y)))


def build(seed: int = 0):
    """(model, inputs [4, 3, 6, 6], targets): the same on every rank."""
    torch.manual_seed(seed)
    model = Model().to(torch.float64).eval()
    with torch.no_grad():  # off DCN's zero initialisation, so offsets and mask get non-trivial gradients
        model.deform.offset_predictor.weight.normal_(0, 0.1)
        model.deform.offset_predictor.bias.normal_(0, 0.1)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(4, 2, 12, 12, dtype=torch.float64)
    return model, x, target


def loss_fn(model, x, target):
    return F.mse_loss(model(x), target)  # a mean over the batch: DDP's gradient average matches it


def gradients(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, target = build()
        ddp = nn.parallel.DistributedDataParallel(model)
        share = x.shape[0] // world
        part = slice(rank * share, (rank + 1) * share)
        loss_fn(ddp, x[part], target[part]).backward()
        torch.save(gradients(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
