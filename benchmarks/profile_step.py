"""Where a training step's time goes: CPU time per operator, load-robust, for either side.

    python benchmarks/profile_step.py [--model smollm2-135m] [--case dense] [--seq-len 256]
                                      [--batch 4] [--side edgetune] [--torch-profiler] [--compile]

Trains a few steps of edgetune's step (packed rows, fused LoRA, chunked loss) or of transformers +
PEFT (padded batch, full logits, `model(...).loss`) on the same examples as
benchmarks/train_speed.py, one torch thread, then times every ATen operator of one more step by the
process's CPU time (a dispatch mode around each call). CPU time, unlike wall time, does not count the
time other jobs hold the core, so on a shared machine the shares stay put while wall times swing.
Matmuls are listed by shape with their GFLOP per CPU-second, against a plain matmul of the
model's MLP shape timed the same way. Run it with another checkout first on PYTHONPATH to profile
that version of edgetune.

--compile wraps every decoder layer in torch.compile first and prints only the per-step CPU times
(the first step includes the compilation): the operator table would time the graph's eager fallback.
"""

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: another checkout wins

import edgetune  # noqa: E402  (first, so the scripts below cannot change which one is used)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from _common import shaped_model, smollm2_dir  # noqa: E402
from train_speed import case_records  # noqa: E402

MATMULS = {"aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm"}


class CpuTimes(TorchDispatchMode):
    """CPU seconds, calls and (for matmuls) FLOPs per ATen operator."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls = collections.Counter(), collections.Counter()
        self.by_shape: dict = collections.defaultdict(lambda: [0.0, 0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        started = time.process_time()
        out = func(*args, **(kwargs or {}))
        spent = time.process_time() - started
        name = str(func.overloadpacket)
        self.seconds[name] += spent
        self.calls[name] += 1
        if name in MATMULS:
            a, b = args[-2], args[-1]
            entry = self.by_shape[(tuple(a.shape), tuple(b.shape))]
            entry[0] += spent
            entry[1] += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            entry[2] += 1
        return out


def examples(model: Path, case: str, seq_len: int, count: int) -> list:
    from transformers import AutoTokenizer

    from edgetune.train.data import encode, fit_to_length

    fmt, records, _ = case_records(case, seq_len)
    tokenizer = AutoTokenizer.from_pretrained(model)
    return fit_to_length(encode(tokenizer, fmt, records[:count]), seq_len, "train")


def edgetune_step(model_dir: Path):
    from edgetune.train.attention import use_segment_attention
    from edgetune.train.data import pack
    from edgetune.train.loss import causal_lm_loss
    from edgetune.train.model import add_lora, load_base

    model = add_lora(load_base(model_dir, torch.float32, "cpu"), 16, 32.0, 0.0, "all-linear", 0,
                     False)
    use_segment_attention(model)

    def loss(batch: list) -> torch.Tensor:
        total, n = causal_lm_loss(model, pack(batch))
        return total / n

    return model, loss


def reference_step(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgetune.train.data import collate

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))

    def loss(batch: list) -> torch.Tensor:
        padded = collate(batch, pad_id=0)
        return model(**padded).loss

    return model, loss


def report(times: CpuTimes, step_cpu: float, peak: float) -> None:
    print(f"\none step: {step_cpu:.2f} CPU-s, {sum(times.seconds.values()):.2f} in operators")
    for name, spent in times.seconds.most_common(25):
        print(f"  {name:<58}{spent:8.3f} s {100 * spent / step_cpu:5.1f}% {times.calls[name]:6d} calls")
    flops = sum(e[1] for e in times.by_shape.values())
    spent = sum(e[0] for e in times.by_shape.values())
    print(f"\nmatmuls: {flops / 1e9:.0f} GFLOP in {spent:.2f} CPU-s, {flops / spent / 1e9:.0f} "
          f"GFLOP/CPU-s; plain matmul of the MLP's shape {peak / 1e9:.0f}")
    rows = sorted(times.by_shape.items(), key=lambda kv: -kv[1][0])[:16]
    for (a, b), (s, f, n) in rows:
        print(f"  {str(a) + ' @ ' + str(b):<40}{s:8.3f} s {n:5d} calls {f / s / 1e9:7.0f} GFLOP/CPU-s")


def matmul_cpu_peak(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(6):
        started = time.process_time()
        a @ b
        best = min(best, time.process_time() - started)
    return 2 * m * k * n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--case", default="dense", choices=("dense", "instruction"))
    parser.add_argument("--side", default="edgetune", choices=("edgetune", "transformers"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps before the profiled one")
    parser.add_argument("--torch-profiler", action="store_true",
                        help="also print torch.profiler's table (wall time) for one more step")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer; per-step CPU times only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"edgetune from {Path(edgetune.__file__).parent}, {args.side} side, {args.case} data")
    model_dir = smollm2_dir() if args.model == "smollm2-135m" else shaped_model(
        args.model, Path(os.environ.get("TMPDIR", "/tmp")) / "edgetune-profile-models")
    data = examples(model_dir, args.case, args.seq_len, args.batch * (args.steps + 2))
    model, loss_of = (edgetune_step if args.side == "edgetune" else reference_step)(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    model.train()
    if args.compile:
        causal_lm = model.get_base_model()
        for layer in causal_lm.model.layers:
            layer.compile()

    def step(i: int) -> float:
        loss = loss_of(data[i * args.batch:(i + 1) * args.batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        value = step(i)
        print(f"step {i}: {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} "
              f"CPU-s, loss {value:.4f}, load {os.getloadavg()[0]:.1f}", flush=True)
    if args.compile:
        return
    times = CpuTimes()
    cpu = time.process_time()
    with times:
        step(args.steps)
    report(times, time.process_time() - cpu, matmul_cpu_peak(
        args.batch * args.seq_len, model.config.hidden_size, model.config.intermediate_size))
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(args.steps + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
