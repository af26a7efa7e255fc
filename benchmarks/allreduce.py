"""How the LoRA gradients of one optimizer step should cross processes: measured, not assumed.

Run as two ranks of a gloo group on this machine:

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/allreduce.py \
        [--model smollm2-135m] [--rank 16] [--repeats 20]

It builds parameters of the exact shapes of the model's LoRA adapter (all linear layers; catalogue
shapes, no weights needed), gives each a gradient through a cheap backward pass, and times three ways
of summing them over the ranks: one all-reduce of one flat buffer (what edgetune does), one
all-reduce per tensor, and DistributedDataParallel's bucketed all-reduce hooked into the backward
pass. Rank 0 prints each median in milliseconds and the flat buffer's effective bandwidth, which
`edgetune plan --nproc` uses for the all-reduce term (edgetune.plan.timing.GLOO_BYTES_PER_S).
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def lora_shapes(model: str, rank: int) -> list[tuple[int, int]]:
    from edgetune.plan.catalogue import CATALOGUE
    from edgetune.shape import shape_from_config

    shape = shape_from_config(dict(CATALOGUE[model][1]), model)
    return [s for _ in range(shape.layers) for a, b in shape.linears() for s in ((rank, a), (b, rank))]


class Adapter(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(*s) * 0.01)
                                              for s in shapes)

    def forward(self) -> torch.Tensor:
        return sum((w * w).sum() for w in self.weights)


def timed(step, repeats: int) -> float:
    step()  # warm-up: connections, buckets
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from edgetune.train.distributed import World

    world = World(dist.get_rank(), dist.get_world_size(), dist.get_world_size(), "gloo")
    adapter = Adapter(lora_shapes(args.model, args.rank))
    params = list(adapter.parameters())
    n = sum(p.numel() for p in params)

    def backward_only() -> None:
        adapter.zero_grad()
        adapter().backward()

    def flat() -> None:
        backward_only()
        world.sum_gradients(params, 0.0)

    def per_tensor() -> None:
        backward_only()
        for p in params:
            dist.all_reduce(p.grad)

    ddp = torch.nn.parallel.DistributedDataParallel(adapter)

    def bucketed() -> None:
        ddp.zero_grad()
        ddp().backward()

    base = timed(backward_only, args.repeats)
    results = {"flat all-reduce": timed(flat, args.repeats),
               "all-reduce per tensor": timed(per_tensor, args.repeats),
               "DDP (25 MiB buckets)": timed(bucketed, args.repeats)}
    if world.main:
        print(f"{args.model} LoRA rank {args.rank}: {len(params)} tensors, {n / 1e6:.2f}M fp32 "
              f"gradients ({n * 4 / 2**20:.1f} MiB); {world.size} gloo ranks on this machine")
        print(f"backward pass alone: {base:.1f} ms (median of {args.repeats})")
        for name, ms in results.items():
            print(f"{name:<24}{ms - base:8.1f} ms beyond the backward pass")
        seconds = (results["flat all-reduce"] - base) / 1000
        print(f"flat buffer: {n * 4 / seconds / 2**20:.0f} MiB/s of gradient summed")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
