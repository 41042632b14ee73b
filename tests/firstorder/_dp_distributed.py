"""A few DP-SGD steps on one global batch per step, run by one process or by several under torchrun.

Every process draws the same global batches and takes its own contiguous share of each; the noise
generator is seeded alike everywhere (dp_sgd_step draws only on rank 0). Rank 0 writes the final
parameters (or the error dp_sgd_step raised) to the file named on the command line.

    python tests/firstorder/_dp_distributed.py OUT [plain|ddp-no-sync|ddp]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch_backprop import BackpropMLP, dp_sgd_step, per_sample

GLOBAL_BATCH, STEPS, SIGMA, CLIP = 12, 3, 0.8, 0.3


def main(out: str, mode: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = BackpropMLP([6, 8, 3], activation="tanh", dtype=torch.float64)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if mode != "plain" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    share = GLOBAL_BATCH // world
    result: object
    try:
        for _ in range(STEPS):
            x = torch.randn(GLOBAL_BATCH, 6, generator=data, dtype=torch.float64)
            y = torch.randint(3, (GLOBAL_BATCH,), generator=data)
            x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
            optimizer.zero_grad(set_to_none=True)
            with per_sample(model, loss_reduction="sum", max_grad_norm=CLIP):
                if mode == "ddp-no-sync":
                    with wrapped.no_sync():
                        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
                else:
                    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
            dp_sgd_step(wrapped, optimizer, SIGMA, CLIP, GLOBAL_BATCH, noise, loss_reduction="mean")
        result = {name: p.detach().clone() for name, p in model.named_parameters()}
    except RuntimeError as error:
        result = str(error)
    if rank == 0:
        torch.save(result, out)
    if distributed:
        # Gloo's worker threads can abort the process while it is torn down ("terminate called
        # without an active exception", one run in ~20 here); once every rank is past the barrier
        # nothing is left to do, so leave without running destructors.
        dist.barrier()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "plain")
