"""Quality against time per method: one PNG from ``idm benchmark`` results.

    python -m benchmarks.tradeoff RUN [RUN ...] --out FILE.png [--methods idm,ddnm,dps] [--title TEXT]

``idm benchmark`` draws this plot of its own run (``OUT/tradeoff.png``); this
command draws it from one or more of its ``--out`` folders (their
``results.csv``), e.g. the baselines of one run beside DPS from runs on some
of the same images. Left: mean PSNR, right: mean SSIM (error bars: one
standard deviation over the images), both against the mean seconds per image
on a log scale; each point is labelled with its method, and the legend gives
each method's NFEs (network evaluations per image) and, where the run
measured it, its peak memory. The same means go to a markdown table beside
the PNG (``FILE.md``), under the command that made it.
Every method is averaged over the same images: those that every plotted
method scored with a finite PSNR and SSIM (an image that two runs scored
with one method counts once, from the first run given). Runs of another
task, operator or protocol, or with another image under one name, are
refused (``benchmarks.compare``), and so are runs that add images of one
method run with other settings (another checkpoint, precision, step size);
runs timed on different hardware are warned about.
"""

from __future__ import annotations

import argparse
import math
import statistics
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.compare import check_same_problem, read_record, read_results
from benchmarks.report import run_script, script_command


@dataclass(frozen=True)
class MethodPoint:
    """One method's means over ``images`` images: PSNR (dB) and SSIM (at most 1) with their standard
    deviations, seconds per image, NFEs per image, peak memory in MiB (``None`` when not measured)."""

    method: str
    images: int
    psnr: float
    psnr_std: float
    ssim: float
    ssim_std: float
    seconds: float
    nfe: int
    peak_mib: float | None

    def label(self) -> str:
        memory = "" if self.peak_mib is None else f", {self.peak_mib:.0f} MiB"
        return f"{self.method} ({self.nfe} NFE{memory})"


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def method_points(rows: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None) -> list[MethodPoint]:
    """The points of ``methods`` (default: every method in ``rows``, in order of appearance), each averaged
    over the images that all of them scored with a finite PSNR and SSIM.

    ``rows``: result rows (``method``, ``image``, ``psnr``, ``ssim``, ``seconds``, ``nfe``, optional
    ``peak_mem_mb`` and ``status``), as ``idm benchmark`` makes them or :func:`read_results` reads them; a
    row with a ``status`` other than ``ok`` or a PSNR or SSIM that is not finite (an exact reconstruction's
    infinite PSNR too) is left out, and so is a second row of one method and image.
    A ``ValueError`` when a method has no row, a row lacks its seconds or NFEs, or the methods have no
    image in common.
    """
    by_method: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("status", "ok") == "ok" and math.isfinite(row["psnr"]) and math.isfinite(row["ssim"]):
            if row.get("seconds") is None or row.get("nfe") is None or not math.isfinite(row["nfe"]):
                raise ValueError(f"{row['method']} on {row['image']}: no seconds or NFEs recorded")
            by_method.setdefault(row["method"], {}).setdefault(row["image"], row)
    chosen = list(dict.fromkeys(methods)) if methods is not None else list(by_method)
    if not chosen:
        raise ValueError("no method to plot")
    absent = [m for m in chosen if m not in by_method]
    if absent:
        raise ValueError(f"no scored image for method(s) {', '.join(absent)} (scored: {', '.join(by_method) or 'none'})")
    common = set.intersection(*(set(by_method[m]) for m in chosen))
    if not common:
        raise ValueError(f"the methods {', '.join(chosen)} scored no image in common")
    points = []
    for method in chosen:
        picked = [by_method[method][image] for image in sorted(common)]
        memory = [r["peak_mem_mb"] for r in picked if r.get("peak_mem_mb") is not None]
        points.append(MethodPoint(
            method=method, images=len(picked),
            psnr=statistics.fmean(r["psnr"] for r in picked), psnr_std=_std([r["psnr"] for r in picked]),
            ssim=statistics.fmean(r["ssim"] for r in picked), ssim_std=_std([r["ssim"] for r in picked]),
            seconds=statistics.fmean(r["seconds"] for r in picked), nfe=int(picked[0]["nfe"]),
            peak_mib=statistics.fmean(memory) if len(memory) == len(picked) else None,
        ))  # fmt: skip
    return points


def points_table(points: Sequence[MethodPoint]) -> str:
    """Markdown: each point's mean ± standard deviation of PSNR and SSIM over its images, its seconds per
    image, NFEs, peak MiB (``-`` where not measured) and image count, one row per method."""
    lines = ["| method | PSNR (dB) | SSIM | seconds / image | NFEs | peak MiB | images |", "|" + "---|" * 7]
    for p in points:
        memory = "-" if p.peak_mib is None else f"{p.peak_mib:.0f}"
        lines.append(f"| `{p.method}` | {p.psnr:.2f} ± {p.psnr_std:.2f} | {p.ssim:.4f} ± {p.ssim_std:.4f} | "
                     f"{p.seconds:.3g} | {p.nfe} | {memory} | {p.images} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def save_tradeoff_plot(points: Sequence[MethodPoint], path: Path, title: str = "") -> None:
    """Write the two panels (PSNR and SSIM against seconds per image, log scale) of ``points`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*Xh<>"
    for ax, (key, name) in zip(axes, (("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
        for i, point in enumerate(points):
            seconds = max(point.seconds, 1e-4)  # a log axis; pinv can take a few microseconds
            ax.errorbar(seconds, getattr(point, key), yerr=getattr(point, f"{key}_std"), fmt=markers[i % len(markers)],
                        capsize=3, markersize=7, label=point.label())  # fmt: skip
            ax.annotate(point.method, (seconds, getattr(point, key)), textcoords="offset points", xytext=(6, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image (log scale)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    images = points[0].images if points else 0
    heading = "".join(textwrap.fill(line, 130) + "\n" for line in title.splitlines())
    fig.suptitle(heading + f"mean over {images} image(s); bars: one standard deviation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: What a run's ``benchmark.json`` records of how it ran each method, beside the method's own options.
METHOD_SETTINGS = {
    "idm": ("checkpoint", "idm_precision", "idm_final_projection"),
    "ddnm": ("prior_sha256",),
    "dps": ("prior_sha256", "dps_zeta"),
}


def options_before_recorded() -> dict[str, dict[str, Any]]:
    """The options that ``idm benchmark`` records of a method since it has them, as the runs before ran
    them: DPS clamped its estimates to :data:`benchmarks.dps.IMAGE_RANGE` before its ``clip_range`` was
    an option (as JSON writes it, a list)."""
    from benchmarks.dps import IMAGE_RANGE

    return {"dps": {"clip_range": list(IMAGE_RANGE)}}


def _method_settings(record: dict[str, Any], method: str) -> dict[str, Any]:
    """How the run of ``record`` (its ``benchmark.json``) ran ``method``; an option that the run predates
    (:func:`options_before_recorded`) as it ran then."""
    options = record.get("method_options")
    options = options.get(method) if isinstance(options, dict) else None
    if isinstance(options, dict):
        options = {**options_before_recorded().get(method, {}), **options}
    kind = "idm" if method.startswith("idm-") else method  # idm-x8, idm-tall: the same checkpoint, run otherwise
    return {**{key: record.get(key) for key in METHOD_SETTINGS.get(kind, ())}, "options": options}


def check_pooled_methods(results: Sequence[tuple[Path, list[dict]]]) -> None:
    """A ``ValueError`` where a method's images come from several runs (an image that two runs scored keeps
    the first run's row, so only runs that add images count) that ran it with other settings (another
    checkpoint, precision, step size, ...: :data:`METHOD_SETTINGS` and the method's options): one point
    would mix them. A warning where the runs were timed on different hardware."""
    records = {run: read_record(run) or {} for run, _ in results}  # {}: a run without that record
    for method in dict.fromkeys(row["method"] for _, rows in results for row in rows):
        seen: set[str] = set()
        adding = []  # the runs that add images of this method to those of the runs before them
        for run, rows in results:
            images = {row["image"] for row in rows if row["method"] == method}
            if images - seen:
                adding.append(run)
            seen |= images
        first = _method_settings(records[adding[0]], method) if adding else {}
        for other in adding[1:]:
            settings = _method_settings(records[other], method)
            differing = [f"{key}: {first.get(key)!r} against {settings.get(key)!r}"
                         for key in dict.fromkeys([*first, *settings]) if first.get(key) != settings.get(key)]  # fmt: skip
            if differing:
                raise ValueError(f"{method} ran with other settings in {adding[0]} and {other} ({'; '.join(differing)}): "
                                 "one point would mix them; plot those runs apart")  # fmt: skip
    hardware = {run: record.get("hardware") for run, record in records.items() if record.get("hardware")}
    if len(set(hardware.values())) > 1:
        shown = "; ".join(f"{run}: {h}" for run, h in hardware.items())
        warnings.warn(f"the runs were timed on different hardware ({shown}): their seconds are not like for like",
                      stacklevel=2)  # fmt: skip


def check_poolable(results: Sequence[tuple[Path, list[dict]]]) -> None:
    """A ``ValueError`` unless the runs (each ``(folder, its results.csv rows)``) can be pooled into one table:
    every run measured the first one's problem (:func:`benchmarks.compare.check_same_problem`) and each method
    ran alike in the runs that add its images (:func:`check_pooled_methods`, which also warns about hardware)."""
    for other, _ in results[1:]:
        check_same_problem(results[0][0], other)
    check_pooled_methods(results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="idm benchmark --out folders")
    parser.add_argument("--methods", help="comma-separated methods to plot, in this order (default: every method)")
    parser.add_argument("--title", default="", help="a line above the plot (default: the command)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        parser.error(f"--out {out} must name a .png file")
    runs = [Path(run) for run in args.runs]
    results = [(run, read_results(run)) for run in runs]
    check_poolable(results)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    points = method_points([row for _, rows in results for row in rows], methods)
    command = script_command("benchmarks.tradeoff", argv)
    save_tradeoff_plot(points, out, args.title or command)
    table = out.with_suffix(".md")
    table.write_text(f"`{command}`\n\n{points_table(points)}")
    for point in points:
        print(f"{point.label()}: {point.psnr:.2f} dB, SSIM {point.ssim:.4f}, {point.seconds:.3g} s per image "
              f"({point.images} images)")  # fmt: skip
    print(f"wrote {out} and {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.tradeoff"))
