"""Time: FLOPs per trained token, the machine's measured matmul speed, and the ETA of a dataset.

`--calibrate` times a bf16/fp32 matmul in a child process (so `edgetune plan` itself never imports
torch) and caches the result under the edgetune cache folder, keyed by CPU model and core count.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from edgetune.plan.memory import Setting, compute_bytes
from edgetune.shape import ModelShape

# Share of the calibration matmul's speed (256x1024 @ 1024x1024) a training step reaches, by base
# quantization, fitted on benchmarks/planner_accuracy.py's medians (docs/planner.md).
EFFICIENCY = {"none": 0.85, "int8": 0.7, "nf4": 0.75}
# With checkpointing the trainer maps every block of 1 MiB or more afresh (edgetune.train.heap.
# lean_heap), which costs speed; fitted the same way.
LEAN_HEAP_EFFICIENCY = 0.7
# Used when the machine was never calibrated: a guess for an idle 2-core laptop, said as such.
DEFAULT_GFLOPS = {"bf16": 20.0, "fp32": 20.0}
# Gradient bytes two gloo ranks on one machine sum per second with one flat all-reduce; measured by
# benchmarks/allreduce.py on SmolLM2's rank-16 adapter (docs/distributed.md). Across machines the
# network sets it instead.
GLOO_BYTES_PER_S = 133 * 2**20
_BENCH = """
import json, time, torch
speeds = {}
for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    a = torch.randn(256, 1024, dtype=dtype); b = torch.randn(1024, 1024, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        a @ b; n += 1
    speeds[name] = round(2 * 256 * 1024 * 1024 * n / (time.perf_counter() - start) / 1e9, 1)
print(json.dumps(speeds))
"""


def flops_per_token(shape: ModelShape, setting: Setting) -> float:
    """Matmul FLOPs to train on one token: forward, backward through the frozen base, LoRA, loss.

    The base weights are frozen, so the backward pass needs only the input gradients (one more
    matmul per layer, not two); checkpointing repeats the forward pass; attention is causal.
    """
    linear = 2 * shape.linear_params
    lora = 2 * shape.lora_params(setting.rank)
    attention = 2 * setting.seq_len * shape.q_dim * shape.layers  # QK^T and AV, half masked
    forward = linear + lora + attention
    backward = linear + 2 * lora + 2 * attention
    recompute = forward if setting.grad_checkpointing else 0
    head = 2 * 2 * shape.hidden * shape.vocab  # logits, then the gradient of the hidden states
    return forward + backward + recompute + head


def _cache_file() -> Path:
    from edgetune.models import cache_root

    return cache_root() / "plan" / "calibration.json"


def _machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}"


def cached_gflops() -> dict | None:
    """The calibration for this machine, or None when it was never run here."""
    file = _cache_file()
    if not file.is_file():
        return None
    entry = json.loads(file.read_text()).get(_machine_key())
    return entry


def calibrate() -> dict:
    """Time a matmul in each compute dtype (a few seconds) and cache the GFLOP/s."""
    out = subprocess.run([sys.executable, "-c", _BENCH], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    file = _cache_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(file.read_text()) if file.is_file() else {}
    data[_machine_key()] = result
    file.write_text(json.dumps(data, indent=2))
    return result


def tokens_per_second(shape: ModelShape, setting: Setting, gflops: dict | None) -> float:
    """Estimated training speed in tokens/s from FLOPs per token and the machine's matmul speed."""
    speed = (gflops or DEFAULT_GFLOPS)[setting.dtype if compute_bytes(setting.dtype) == 2 else "fp32"]
    efficiency = EFFICIENCY[setting.quant] * (LEAN_HEAP_EFFICIENCY if setting.grad_checkpointing else 1)
    return efficiency * speed * 1e9 / flops_per_token(shape, setting)


def eta_seconds(tokens: int, tokens_per_s: float) -> float:
    return tokens / tokens_per_s if tokens_per_s > 0 else float("inf")


def format_duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def data_parallel(single: float, nproc: int, step_tokens: int, gradient_bytes: int) -> tuple[float, float]:
    """(tokens/s of `nproc` processes together, seconds of all-reduce per step).

    The processes share this machine's cores, so together they compute at the speed of one process
    using them all (`single`); each step adds one ring all-reduce of the adapter's gradients, in
    which every rank sends and receives 2 (n - 1) / n of them.
    """
    if nproc == 1:
        return single, 0.0
    reduce_s = 2 * (nproc - 1) / nproc * gradient_bytes / GLOO_BYTES_PER_S
    return step_tokens / (step_tokens / single + reduce_s), reduce_s
