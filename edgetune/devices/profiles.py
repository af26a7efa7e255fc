"""Device profiles: one YAML file per device, built-in or the user's own, loaded into `Profile`s.

Built-in profiles live in `profiles/` beside this file. Users add or override profiles by dropping
`NAME.yaml` files into `$EDGETUNE_DEVICES` or, when that is unset, `~/.config/edgetune/devices/`;
a user file with a built-in's name replaces it. The file name (without .yaml) is the profile's name.

A profile is data, not code: RAM (binary units, as `8gb` means 8 GiB everywhere in edgetune), the
share of it one app can use, cores, ISA features, peak memory bandwidth in GB/s (decimal, as vendors
publish it), the runtimes it takes in order of preference, and a `sources` entry for every figure.
Nothing here imports torch.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.units import parse_size

BUILTIN_DIR = Path(__file__).parent / "profiles"
# runtime -> the export format it loads (the format's name is its `edgetune export` flag)
RUNTIMES = {"llama.cpp": "gguf", "onnxruntime-genai": "onnx", "onnxruntime": "onnx-generic",
            "executorch": "executorch", "litert-lm": "litert"}
REQUIRED = ("description", "ram", "usable_share", "cores", "isa", "memory_bandwidth_gbs", "runtimes",
            "sources")
OPTIONAL = ("bandwidth_efficiency",)
# Figures that must each say where they come from.
SOURCED = ("ram", "usable_share", "cores", "isa", "memory_bandwidth_gbs")
# llama.cpp's CPU decode reads weights at roughly half of peak DRAM bandwidth on phones and boards
# (the rest goes to refresh, bank conflicts and compute stalls); a profile can set its own figure.
DEFAULT_BANDWIDTH_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Profile:
    """One device: what it has and what it runs."""

    name: str
    description: str
    ram_bytes: int
    usable_share: float  # of ram_bytes, for one app (OS, desktop and app limits take the rest)
    cores: int
    isa: tuple[str, ...]
    memory_bandwidth_gbs: float  # peak, decimal GB/s
    runtimes: tuple[str, ...]  # in order of preference
    sources: dict = field(compare=False)
    bandwidth_efficiency: float = DEFAULT_BANDWIDTH_EFFICIENCY
    path: Path | None = field(default=None, compare=False)

    @property
    def usable_bytes(self) -> int:
        return int(self.ram_bytes * self.usable_share)

    @property
    def formats(self) -> tuple[str, ...]:
        """Export formats its runtimes load, in the profile's order of preference."""
        return tuple(dict.fromkeys(RUNTIMES[r] for r in self.runtimes))


def user_dir() -> Path:
    """Where user profiles live: $EDGETUNE_DEVICES, else ~/.config/edgetune/devices."""
    env = os.environ.get("EDGETUNE_DEVICES")
    return Path(env).expanduser() if env else Path.home() / ".config" / "edgetune" / "devices"


def load_file(path: Path) -> Profile:
    """Read and check one profile file; every problem is an error naming the file and the key."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgetuneError(f"device profile {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgetuneError(f"device profile {path}: expected a mapping of keys to values")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        known = ", ".join(REQUIRED + OPTIONAL)
        raise EdgetuneError(f"device profile {path}: unknown key {unknown[0]!r}; known keys: {known}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise EdgetuneError(f"device profile {path}: missing key {missing[0]!r}")
    return _profile(path, data)


def _profile(path: Path, data: dict) -> Profile:
    def bad(key: str, why: str) -> EdgetuneError:
        return EdgetuneError(f"device profile {path}: {key}: {data.get(key)!r} {why}")

    runtimes = data["runtimes"]
    if not isinstance(runtimes, list) or not runtimes or any(r not in RUNTIMES for r in runtimes):
        raise bad("runtimes", f"must be a list of runtimes out of {', '.join(RUNTIMES)}")
    sources = data["sources"]
    if not isinstance(sources, dict):
        raise bad("sources", "must map each figure to where it comes from")
    unsourced = [k for k in SOURCED if not str(sources.get(k) or "").strip()]
    if unsourced:
        raise bad("sources", f"has no entry for {unsourced[0]!r}: say where that figure comes from")
    if not isinstance(data["isa"], list):
        raise bad("isa", "must be a list of instruction-set features, e.g. [armv8.2-a, neon, dotprod]")
    try:
        profile = Profile(
            name=path.stem, description=str(data["description"]), ram_bytes=parse_size(data["ram"]),
            usable_share=float(data["usable_share"]), cores=int(data["cores"]),
            isa=tuple(str(x) for x in data["isa"]), memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]),
            runtimes=tuple(runtimes), sources=dict(sources), path=path,
            bandwidth_efficiency=float(data.get("bandwidth_efficiency", DEFAULT_BANDWIDTH_EFFICIENCY)))
    except (TypeError, ValueError, EdgetuneError) as exc:
        raise EdgetuneError(f"device profile {path}: {exc}") from None
    checks = {"usable_share": 0 < profile.usable_share <= 1, "cores": profile.cores >= 1,
              "memory_bandwidth_gbs": profile.memory_bandwidth_gbs > 0, "ram": profile.ram_bytes > 0,
              "bandwidth_efficiency": 0 < profile.bandwidth_efficiency <= 1}
    for key, ok in checks.items():
        if not ok:
            raise bad(key, "is out of range")
    return profile


def load_profiles(user: Path | None = None) -> dict[str, Profile]:
    """All profiles by name: the built-in ones, then the user's (which replace same-named ones)."""
    folders = [BUILTIN_DIR, user if user is not None else user_dir()]
    profiles: dict[str, Profile] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                profiles[path.stem] = load_file(path)
    return profiles


def get(name: str) -> Profile:
    """The profile called `name`; an unknown name is an error listing the known ones."""
    profiles = load_profiles()
    if name not in profiles:
        raise EdgetuneError(f"unknown device {name!r}; known devices: {', '.join(profiles)} "
                            f"(add your own as {user_dir()}/{name}.yaml)")
    return profiles[name]

