"""`edgetune devices`: the device profiles as a table, or one profile with its sources."""

from edgetune.devices.config import DevicesConfig
from edgetune.devices.profiles import Profile, get, load_profiles, user_dir
from edgetune.tables import columns
from edgetune.units import format_size


def _row(p: Profile) -> tuple[str, ...]:
    return (p.name, format_size(p.ram_bytes), format_size(p.usable_bytes), str(p.cores),
            f"{p.memory_bandwidth_gbs:g} GB/s", ", ".join(p.runtimes), p.description)


def table(profiles: list[Profile], fit_column: list[str] | None = None) -> str:
    """Profiles as aligned columns; `fit_column` adds what fits each one."""
    head = ("device", "RAM", "one app", "cores", "bandwidth", "runtimes", "description")
    rows = [head] + [_row(p) for p in profiles]
    if fit_column is not None:
        rows = [r[:-1] + (f,) for r, f in zip(rows, ["fits (predicted decode)"] + fit_column)]
    return columns(rows)


def details(p: Profile) -> str:
    lines = [f"{p.name}: {p.description}", f"  file: {p.path}",
             f"  RAM {format_size(p.ram_bytes)}, one app may use {p.usable_share:.0%} "
             f"({format_size(p.usable_bytes)})", f"  cores {p.cores}; ISA {', '.join(p.isa)}",
             f"  memory bandwidth {p.memory_bandwidth_gbs:g} GB/s peak, "
             f"{p.bandwidth_efficiency:.0%} of it assumed reached in decoding",
             f"  runtimes (preferred first): {', '.join(p.runtimes)}", "  sources:"]
    lines += [f"    {key}: {' '.join(str(text).split())}" for key, text in p.sources.items()]
    return "\n".join(lines)


def _fit_cell(name: str, shape, ctx: int) -> str:
    from edgetune.devices.selection import fits

    target = fits(name, shape, ctx)
    if not target.fits:
        return f"nothing (smallest needs {format_size(target.smallest.total_bytes)})"
    best = target.choices[0]
    return f"{best.name}, {format_size(best.total_bytes)}, ~{best.tokens_per_s:.0f} tok/s"


def main(config: DevicesConfig) -> int:
    if config.show:
        print(details(get(config.show)))
        return 0
    profiles = list(load_profiles().values())
    fit_column = None
    if config.model:
        from edgetune.devices.selection import shape_from_folder
        from edgetune.models import resolve

        shape = shape_from_folder(resolve(config.model, config.cache_dir))
        fit_column = [_fit_cell(p.name, shape, config.ctx) for p in profiles]
        print(f"{config.model} with a {config.ctx}-token context:")
    print(table(profiles, fit_column))
    print(f"\nAdd your own device as {user_dir()}/NAME.yaml (or set $EDGETUNE_DEVICES); "
          "see `edgetune devices --show rpi5-8gb` for the keys.")
    return 0
