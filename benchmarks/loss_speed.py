"""The output layer and loss over every position, three ways, on one model's shape: CPU time and
GFLOP per CPU-second of forward + hidden-state gradient.

    python benchmarks/loss_speed.py [--shape qwen2.5-0.5b] [--tokens 1024] [--threads 2] [--repeats 5]

- full: one (tokens x vocab) matmul, F.cross_entropy, autograd's backward (the reference's way);
- token chunks: chunks of tokens against the whole vocabulary, logsumexp, softmax in place, the
  hidden-state gradient computed in the forward pass (a fused linear-cross-entropy that holds one
  chunk's full rows of logits);
- blocked: edgetune's loss (train/loss.py): blocks of vocabulary rows with an online softmax, never
  more than one block of logits, for several (rows, tokens per chunk) settings.

Every token is labelled, as on dense text. Times are the median of --repeats after one untimed call;
CPU time (process_time) is reported beside wall time because the machine may be shared.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgetune.train import loss as edgetune_loss  # noqa: E402

SHAPES = {"qwen2.5-0.5b": (896, 151936), "smollm2-135m": (576, 49152)}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median CPU seconds, median wall seconds) of `fn`, after one untimed call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return sorted(cpu)[repeats // 2], sorted(wall)[repeats // 2]


def full(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(h @ w.T, t, reduction="sum")


def token_chunks(chunk: int):
    class _Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, t):
            grad, total = torch.empty_like(h), torch.zeros(())
            for s in range(0, len(h), chunk):
                logits, tt = h[s:s + chunk] @ w.T, t[s:s + chunk]
                lse = torch.logsumexp(logits, 1)
                total += (lse - logits.gather(1, tt[:, None])[:, 0]).sum()
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(tt)), tt] -= 1
                torch.mm(probs, w, out=grad[s:s + chunk])
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, g):
            return ctx.saved_tensors[0] * g, None, None

    return _Chunked.apply


def blocked(rows: int, chunk: int):
    def fn(h, w, t):
        original = edgetune_loss.chunk_tokens
        edgetune_loss.chunk_tokens = lambda _rows: chunk
        try:
            return edgetune_loss._LinearCrossEntropy.apply(h, w, t, rows)
        finally:
            edgetune_loss.chunk_tokens = original

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden, vocab = SHAPES[args.shape]
    torch.manual_seed(0)
    h = (torch.randn(args.tokens, hidden) * 0.5).requires_grad_()
    w, t = torch.randn(vocab, hidden) * 0.05, torch.randint(0, vocab, (args.tokens,))
    cases = [("full matmul + cross_entropy", full)]
    cases += [(f"token chunks of {c}, whole vocabulary", token_chunks(c)) for c in (128,)]
    cases += [(f"blocked {r} rows, {c} tokens{' (default)' if r == 4096 else ''}", blocked(r, c))
              for r, c in ((4096, 1024), (2048, 2048), (16384, 256))]
    reference = full(h, w, t).item()
    flops = 4 * args.tokens * hidden * vocab  # logits, then the hidden-state gradient
    print(f"{args.shape}: {args.tokens} tokens x {hidden} hidden x {vocab} vocab, {args.threads} "
          f"threads, median of {args.repeats}")
    for name, fn in cases:
        loss = fn(h, w, t).item()
        assert abs(loss - reference) <= 1e-4 * abs(reference), (name, loss, reference)

        def step():
            fn(h, w, t).backward()
            h.grad = None

        cpu, wall = timed(step, args.repeats)
        print(f"  {name:<40} {cpu * 1e3:7.0f} CPU-ms {wall * 1e3:7.0f} ms "
              f"{flops / cpu / 1e9:6.1f} GFLOP/CPU-s", flush=True)


if __name__ == "__main__":
    main()
