"""What the benchmarks share: the medians table of the timing ones and the line saying what
`--mixed_precision auto` resolves to (common.fresh_accelerator_state comes before each training
script's main a benchmark runs). Every benchmark also prints common.machine_description() once, by its table: a
timing means little without the machine it ran on.
"""
import statistics

import common


def print_medians(title, times):
    """times {setting: [seconds a step, one per turn]} -> prints title and a markdown table of the
    medians, each against the first setting's; returns {setting: median seconds}."""
    first = next(iter(times))
    base = statistics.median(times[first])
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(title)
    print(common.markdown_table(["setting", "s/step", f"against {first}"],
                                [[name, f"{med:.3f}", f"{base / med:.2f}x"] for name, med in medians.items()]))
    return medians


def auto_precision(cuda=None):
    """(setting, one line): what `--mixed_precision auto` runs on this machine, and why; cuda=False:
    on its CPU (a step this benchmark runs on the CPU whatever the machine has)."""
    setting, why = common.resolve_mixed_precision("auto", cuda=cuda)
    where = "this machine's CPU" if cuda is False else "this machine"
    return setting, f"--mixed_precision auto on {where}: {setting} ({why})"
