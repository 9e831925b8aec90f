"""cuconv.torch under DistributedDataParallel: two gloo processes (CPU tensors, the
interpret backend), each on half the batch, give the gradients of one process on the
whole batch. The model and the worker are in tests/torch_ddp_worker.py."""

import socket

import torch
import torch.multiprocessing as mp

import torch_ddp_worker as ddp_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    model, x, target = ddp_worker.build()
    ddp_worker.loss_fn(model, x, target).backward()
    expected = ddp_worker.gradients(model)
    assert all(g.abs().max() > 0 for g in expected.values())  # every parameter gets a gradient

    mp.spawn(ddp_worker.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-13, msg=f"rank {rank}: {name}")
