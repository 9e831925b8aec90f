"""Plots of a benchmark result (the JSON `cuconv bench` writes): the speed ratio against
each baseline per shape and op, and a roofline placing every row against the ceilings
measured in the same run. matplotlib is imported here only (`pip install cuconv[bench]`)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def ratio_chart(result: dict, path: Path) -> Path:
    """One panel per op: baseline time / cuconv time for every (shape, dtype, pass) row and
    baseline (above 1 = cuconv faster)."""
    plt = _pyplot()
    ops = list(dict.fromkeys(r["op"] for r in result["rows"]))
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 2.2 + 0.32 * max(
        sum(r["op"] == op for r in result["rows"]) for op in ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in result["rows"] if r["op"] == op]
        names = list(dict.fromkeys(n for r in rows for n in r["baselines"]))
        labels = [f"{r['shape']} {r['dtype']} {r['pass']}" for r in rows]
        height = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            ratios = [r["baselines"].get(name, {}).get("ratio", 0.0) for r in rows]
            ax.barh([j + i * height for j in range(len(rows))], ratios, height=height, label=f"{name} / cuconv")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("baseline time / cuconv time (>1: cuconv faster)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['device']} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def roofline(result: dict, path: Path) -> Path:
    """Left: achieved TFLOP/s against arithmetic intensity (FLOPs / compulsory bytes) for
    every row with FLOPs, under the measured copy-bandwidth and GEMM ceilings. Right, when
    there are any: the rows that only move data (no FLOPs), in GB/s against the copy ceiling."""
    plt = _pyplot()
    ceilings = result["ceilings"]
    bandwidth_tb = ceilings["copy_gbs"] / 1e3  # TB/s = TFLOP/s per FLOP/byte
    compute = [r for r in result["rows"] if "tflops" in r and "gbs" in r]
    movement = [r for r in result["rows"] if "tflops" not in r and "gbs" in r]
    fig, axes = plt.subplots(1, 2 if movement else 1, figsize=(13 if movement else 8, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if movement else None)
    ax = axes[0, 0]
    intensities = [r["tflops"] / (r["gbs"] / 1e3) for r in compute]
    lo = min(intensities + [1.0]) / 4
    hi = max(intensities + [ceilings["gemm_tflops"] / bandwidth_tb]) * 4
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    ax.plot(xs, [min(ceilings["gemm_tflops"], bandwidth_tb * x) for x in xs], color="black", linewidth=1.2,
            label=f"ceilings: copy {ceilings['copy_gbs']:.0f} GB/s, {ceilings['gemm']} {ceilings['gemm_tflops']:.0f} TFLOP/s")
    for op in dict.fromkeys(r["op"] for r in compute):
        mine = [(i, r) for i, r in zip(intensities, compute) if r["op"] == op]
        ax.scatter([i for i, _ in mine], [r["tflops"] for _, r in mine], s=18, label=op)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / compulsory byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title("roofline", fontsize=10)
    ax.legend(fontsize=7)
    if movement:
        ax = axes[0, 1]
        labels = [f"{r['op']} {r['shape']} {r['dtype']} {r['pass']}" for r in movement]
        ax.barh(range(len(movement)), [r["gbs"] for r in movement], color="tab:green")
        ax.axvline(ceilings["copy_gbs"], color="black", linewidth=1.2, label="device-to-device copy")
        ax.set_yticks(range(len(movement)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("achieved GB/s (read + write)")
        ax.set_title("data movement (no FLOPs)", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: dict, json_path: Path) -> list[Path]:
    """<results>.json -> <results>-ratios.png and <results>-roofline.png beside it."""
    stem = json_path.with_suffix("")
    return [ratio_chart(result, Path(f"{stem}-ratios.png")), roofline(result, Path(f"{stem}-roofline.png"))]
