"""Where the memory of one `edgetune train` goes: resident memory sampled through the run, by phase.

    python benchmarks/memory_timeline.py [--every-layers N] -- <edgetune train flags>

Runs the trainer in this process with a thread that reads /proc/self/status every 20 ms (tracemalloc
does not see torch's allocations) and hooks that name the phase: loading, LoRA, each step's decoder
layers, the loss, the backward pass (with checkpointing's recomputation) and the optimizer. Prints
the peak resident set of each phase (anonymous and file-backed), the step and phase where the run
peaked, and VmHWM at the end.
"""

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) * 1024
    return values


class Timeline:
    """Peak (RSS, anon, file) per phase, in the order phases first appeared."""

    def __init__(self) -> None:
        self.phase, self.step, self.peaks = "start", 0, {}
        self.lock = threading.Lock()

    def mark(self, phase: str) -> None:
        with self.lock:
            self.phase = f"step {self.step}: {phase}" if self.step else phase
        self.sample()

    def sample(self) -> None:
        s = status()
        with self.lock:
            old = self.peaks.get(self.phase, (0, 0, 0))
            if s["VmRSS"] > old[0]:
                self.peaks[self.phase] = (s["VmRSS"], s["RssAnon"], s["RssFile"])

    def run(self) -> None:
        while True:
            self.sample()
            time.sleep(0.02)


def hook(timeline: Timeline, every: int) -> None:
    """Phase marks on the trainer's loading, LoRA layers, decoder layers, backward and optimizer."""
    import torch

    from edgetune.train import model as model_lib

    load_base, add_lora = model_lib.load_base, model_lib.add_lora

    def loading(*args, **kwargs):
        timeline.mark("load")
        model = load_base(*args, **kwargs)
        timeline.mark("loaded")
        return model

    def adapted(*args, **kwargs):
        model = add_lora(*args, **kwargs)
        decoder = model.get_base_model().model
        last = len(decoder.layers) - 1
        for i, layer in enumerate(decoder.layers):
            if i % every == 0 or i == last:
                layer.register_forward_pre_hook(lambda *_, i=i: timeline.mark(f"forward layer {i}"))
        decoder.norm.register_forward_hook(lambda *_: timeline.mark("loss"))
        timeline.mark("lora added")
        return model

    backward = torch.Tensor.backward

    def marked_backward(self, *args, **kwargs):
        timeline.mark("backward")
        result = backward(self, *args, **kwargs)
        timeline.mark("optimizer")
        return result

    model_lib.load_base, model_lib.add_lora = loading, adapted
    torch.Tensor.backward = marked_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-layers", type=int, default=4, help="mark every N-th decoder layer")
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]
    timeline = Timeline()
    threading.Thread(target=timeline.run, daemon=True).start()
    from edgetune.cli import parser as cli_parser
    from edgetune.config import build, overrides_from
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    config = build(TrainConfig, None, overrides_from(cli_parser("train").parse_args(["train", *flags]),
                                                     TrainConfig))
    hook(timeline, args.every_layers)

    def on_step(step: int) -> None:
        timeline.step = step + 1
        timeline.mark("start")

    train(config, on_step=on_step)
    timeline.step = 0
    timeline.mark("end")
    gib = 2**30
    print(f"\n{'phase':<34}{'peak RSS':>10}{'anon':>9}{'file':>9}  (GiB)")
    for phase, (rss, anon, file) in timeline.peaks.items():
        print(f"{phase:<34}{rss / gib:>10.3f}{anon / gib:>9.3f}{file / gib:>9.3f}")
    top = max(timeline.peaks, key=lambda p: timeline.peaks[p][0])
    print(f"\npeak in '{top}'; VmHWM {status()['VmHWM'] / gib:.3f} GiB")


if __name__ == "__main__":
    main()
