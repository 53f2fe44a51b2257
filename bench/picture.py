"""``make bench``'s picture: RTT distributions of ours and mosquitto, and every ratio as a bar.

Drawn with matplotlib, the optional ``report`` extra that ``make bench`` installs; without it
the benchmark says so and writes its tables as before.
"""

from __future__ import annotations

from pathlib import Path

PICTURE = Path(__file__).with_name("results.png")

Row = tuple[str, float, float, str, float]
"""(metric, ours, mosquitto, unit, ours / mosquitto), as bench.run builds its table."""

LOWER_IS_BETTER_UNITS = ("ms", "us", "MiB")


def draw(rows: list[Row], samples: dict[int, dict[str, list[float]]]) -> str:
    """Draw bench/results.png; return a line saying where it is, or why it was not drawn."""
    try:
        import matplotlib  # noqa: PLC0415 - an optional extra, imported only to draw
    except ImportError:
        return "Picture skipped: matplotlib is not installed (make bench installs it)."
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    fig = plt.figure(figsize=(12, 10), dpi=100)
    grid = fig.add_gridspec(2, 2, height_ratios=(2, 3))
    for column, qos in enumerate((0, 1)):
        ax = fig.add_subplot(grid[0, column])
        runs = samples.get(qos, {})
        values = [v for kind in ("ours", "mosquitto") for v in runs.get(kind, [])]
        if values:
            ordered = sorted(values)
            low, top = ordered[0], ordered[int(len(values) * 0.995) - 1]  # 0.5 % off the axis
            bins = [low + (top - low) * i / 60 for i in range(61)]
            for kind, color in (("ours", "tab:blue"), ("mosquitto", "tab:gray")):
                data = runs.get(kind, [])
                ax.hist(data, bins=bins, histtype="step", linewidth=1.5, color=color,
                        label=f"{kind} ({len(data)} pings)")  # fmt: skip
            ax.legend(fontsize="small")
        ax.set_title(f"RTT, our clients, pings 10 ms apart, MQTT 5, QoS {qos}", fontsize="medium")
        ax.set_xlabel("RTT (ms)")
        ax.set_ylabel("pings")
        ax.grid(alpha=0.3)

    bars = fig.add_subplot(grid[1, :])
    shown = [row for row in rows if row[4] == row[4]]  # without NaN ratios
    names = [metric for metric, *_ in shown]
    ratios = [ratio for *_, ratio in shown]
    # Green where ours does better (lower time or memory, higher rate), red where it does worse.
    colors = [
        "tab:green" if (ratio <= 1) == (unit in LOWER_IS_BETTER_UNITS) else "tab:red"
        for _, _, _, unit, ratio in shown
    ]
    positions = range(len(shown))
    bars.barh(positions, ratios, color=colors, alpha=0.8)
    bars.axvline(1.0, color="black", linewidth=1)
    bars.set_yticks(list(positions), names, fontsize="x-small")
    bars.invert_yaxis()
    bars.set_xscale("log")
    bars.set_xlabel("ours / mosquitto (log scale; green: ours better, red: mosquitto better)")
    bars.grid(axis="x", alpha=0.3)
    fig.suptitle("make bench: ours beside mosquitto, same run")
    fig.tight_layout()
    fig.savefig(PICTURE)
    plt.close(fig)
    return f"Picture: {PICTURE}"
