"""``make bench``'s picture: RTT distributions of ours and mosquitto, and every ratio as a bar.

Drawn with matplotlib, the optional ``report`` extra that ``make bench`` installs; without it
the benchmark says so and writes its tables as before.
"""

from __future__ import annotations

from pathlib import Path

PICTURE = Path(__file__).with_name("results.png")

Row = tuple[str, float, float, str, float]
"""(metric, ours, mosquitto, unit, ours / mosquitto), as bench.run builds its table."""

LOWER_IS_BETTER_UNITS = ("ms", "us", "MiB", "KiB")


def scale_rows(cells: list[tuple[str, str, str, str]]) -> list[Row]:
    """The scale table's rows (strings: metric, "3.4 KiB", "1.7 KiB", "1.97x") as Rows.

    A row without a ratio (a count, such as the deliveries seen) is not drawn.
    """
    out: list[Row] = []
    for metric, ours, theirs, ratio in cells:
        if not ratio:  # a count, not a figure to compare
            continue
        value, unit = ours.split()[:2]
        ratio_value = float(ratio.split()[0].rstrip("x"))  # "0.70x", or "0.70x (0.64-0.76)"
        out.append((metric, float(value), float(theirs.split()[0]), unit, ratio_value))
    return out


def draw(rows: list[Row], samples: dict[int, dict[str, list[float]]]) -> str:
    """Draw bench/results.png; return a line saying where it is, or why it was not drawn."""
    try:
        import matplotlib  # noqa: PLC0415 - an optional extra, imported only to draw
    except ImportError:
        return "Picture skipped: matplotlib is not installed (make bench installs it)."
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    height = 5.5 + 0.3 * len(rows)  # inches: the histograms, then a bar per row
    fig = plt.figure(figsize=(13, height), dpi=100)
    # Two grids: the bars' long labels need a wide left margin the histograms do not.
    upper = fig.add_gridspec(1, 2, left=0.06, right=0.98, top=1 - 0.7 / height,
                           bottom=1 - 4.3 / height, wspace=0.2)  # fmt: skip
    below = fig.add_gridspec(1, 1, left=0.34, right=0.97, top=1 - 5.2 / height,
                             bottom=0.7 / height)  # fmt: skip
    for column, qos in enumerate((0, 1)):
        ax = fig.add_subplot(upper[0, column])
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

    bars = fig.add_subplot(below[0, 0])
    shown = [row for row in rows if row[4] == row[4] and row[4] > 0]  # without NaN ratios
    names = [metric for metric, *_ in shown]
    ratios = [ratio for *_, ratio in shown]
    # Better or worse for us: a lower time or memory, or a higher rate, is better. Told by
    # colour and by hatching, and each bar says its ratio.
    better = [(ratio <= 1) == (unit in LOWER_IS_BETTER_UNITS) for _, _, _, unit, ratio in shown]
    positions = list(range(len(shown)))
    for y, ratio, good in zip(positions, ratios, better, strict=True):
        bars.barh(y, ratio - 1, left=1.0, color="tab:green" if good else "tab:red",
                  hatch=None if good else "//", edgecolor="white", alpha=0.8)  # fmt: skip
        bars.text(ratio * (1.03 if ratio >= 1 else 0.97), y, f"{ratio:.2f}x", va="center",
                  ha="left" if ratio >= 1 else "right", fontsize="small")  # fmt: skip
    bars.axvline(1.0, color="black", linewidth=1)
    bars.set_yticks(positions, names, fontsize="small")
    bars.invert_yaxis()
    bars.set_xscale("log")
    low, high = min([*ratios, 1.0]), max([*ratios, 1.0])
    bars.set_xlim(low / 1.6, high * 1.6)  # room for the labels
    bars.set_xlabel("ours / mosquitto, bars from 1.0 (log scale): green, ours better; red and "
                    "hatched, mosquitto better")  # fmt: skip
    bars.grid(axis="x", alpha=0.3)
    fig.suptitle("make bench: ours beside mosquitto, same run")
    fig.savefig(PICTURE)
    plt.close(fig)
    return f"Picture: {PICTURE}"
