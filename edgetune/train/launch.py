"""`edgetune train --nproc N`: start N ranks of the run on this machine through torch.distributed's
launcher (the elastic agent behind torchrun), each running `python -m edgetune train` with the same
settings. The launcher rendezvouses them on a free local port, watches them, and stops the others
when one fails; this process only reports how the run ended.
"""

import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from edgetune.config import given_names
from edgetune.errors import EdgetuneError
from edgetune.folders import say
from edgetune.train.config import TrainConfig


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(config: TrainConfig, verb: str = "train") -> int:
    """Run `config` as `config.nproc` local ranks; returns the exit status of the run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = config.nproc
    if n > cores():
        # Correct but slower than n = cores: the ranks take turns on the cores. Allowed, because
        # trying a multi-machine setup on one small machine first is worth a slow run.
        say(f"--nproc {n} is more than the {cores()} cores here: the processes will share cores "
            f"(1 thread each), slower than --nproc {cores()}")
    settings = {name: getattr(config, name) for name in given_names(config) - {"config"}}
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"edgetune-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        rdzv_configs={"join_timeout": config.dist_timeout})
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    with tempfile.TemporaryDirectory(prefix="edgetune-launch-") as tmp:
        settings_file = Path(tmp) / "train.yaml"  # every rank reads the settings given here
        settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        agent_log.setLevel(logging.CRITICAL)  # failures are reported below, in one line
        try:
            elastic_launch(launch_config, sys.executable)("-m", "edgetune", verb, str(settings_file))
        except ChildFailedError as exc:
            return _failed(exc, config)
        finally:
            agent_log.setLevel(level)
    return 0


def _failed(exc: Any, config: TrainConfig) -> int:
    """The exit status of a failed run, with one line when a rank was killed (it could not say why).

    The launcher ends the remaining ranks with SIGTERM once one has exited non-zero; those are not
    causes. A rank that exited with a status (rank 0's memory stop, an error it printed) speaks for
    the run; rank 0's status is preferred.
    """
    import signal

    failures = exc.failures  # global rank -> ProcessFailure
    killed = {r: f for r, f in failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM}
    if killed:
        rank = min(killed)
        name = signal.Signals(-killed[rank].exitcode).name
        raise EdgetuneError(f"rank {rank} of {config.nproc} was killed ({name}); the others were "
                            f"stopped. Continue from the last checkpoint with: edgetune train "
                            f"--resume --output {config.output} --nproc {config.nproc}")
    said = [failures[r].exitcode for r in sorted(failures) if failures[r].exitcode > 0]
    return said[0] if said else 128 + signal.SIGTERM
