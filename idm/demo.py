"""``idm demo``: every shipped model on sample images that come with the install.

    from idm.demo import run_demo
    table = run_demo("idm-demo", device=torch.device("cpu"))

For each :data:`DEMO_CASES` entry the shipped model that serves it
(:mod:`idm.shipped`) reconstructs the sample images (scikit-image's bundled
photographs, centre-cropped to 256 x 256; the Shepp-Logan phantom for MRI and CT)
next to the pseudo-inverse ``A^+ y`` (zero-filled for MRI), through the same
harness and scoring as ``idm benchmark`` (:func:`benchmarks.harness.run_benchmark`;
CS with the authors' protocol).
Written to ``out``: ``<case>/results.csv``, ``<case>/grids/<image>.png``
(ground truth | A^+ y | IDM), ``demo.png`` (the first image of every case,
one row each), ``demo.md`` (the table, also returned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

#: Side of the square sample images.
DEMO_SIZE = 256
#: scikit-image sample images used by the demo (name -> loader name in ``skimage.data``).
SAMPLE_IMAGES = ("camera", "astronaut", "coffee")


@dataclass(frozen=True)
class DemoCase:
    """One setting the demo runs: ``task`` with operator ``overrides``, shown as ``label``."""

    label: str
    task: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: "photographs" (:data:`SAMPLE_IMAGES`) or "phantom" (Shepp-Logan: MRI and CT).
    images: str = "photographs"


#: The settings of the shipped models (issues #6 and #7).
DEMO_CASES: tuple[DemoCase, ...] = (
    DemoCase("cs-10", "cs", {"ratio": 0.1}),
    DemoCase("cs-30", "cs", {"ratio": 0.3}),
    DemoCase("cs-50", "cs", {"ratio": 0.5}),
    DemoCase("cs-20", "cs", {"ratio": 0.2}),  # no model for 20 % alone: the one for every ratio (cs-ratio-1-50)
    DemoCase("inpainting-50-missing", "inpainting", {"mask": "random", "ratio": 0.5}),
    DemoCase("inpainting-80-missing", "inpainting", {"mask": "random", "ratio": 0.2}),
    DemoCase("inpainting-box", "inpainting", {"mask": "box"}),
    DemoCase("mri-4x", "mri", {"acceleration": 4}, images="phantom"),
    DemoCase("mri-8x", "mri", {"acceleration": 8, "center_fraction": 0.04}, images="phantom"),
    DemoCase("ct-60", "ct", {"views": 60}, images="phantom"),
    DemoCase("ct-18", "ct", {"views": 18}, images="phantom"),
)


def sample_images(color: str, names: tuple[str, ...] = SAMPLE_IMAGES, size: int = DEMO_SIZE) -> list[Any]:
    """scikit-image's bundled photographs as :class:`~benchmarks.harness.BenchmarkImage`.

    Each is centre-cropped to ``size`` x ``size`` and converted to ``color``
    (``"rgb"``: 3 channels; ``"y"`` / ``"gray"``: 1 channel, the Y of YCbCr as
    the toolkit's image loaders). Values float32 in [0, 1].
    """
    from skimage import data as samples

    from benchmarks.harness import BenchmarkImage
    from tasks.data.images import rgb_to_y

    images = []
    for name in names:
        pixels = np.asarray(getattr(samples, name)(), dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels[..., None] if pixels.ndim == 2 else pixels).permute(2, 0, 1)
        if x.shape[0] == 1 and color == "rgb":
            continue  # a grey photograph cannot show colour inpainting
        if x.shape[0] == 3 and color != "rgb":
            x = rgb_to_y(x[None])[0]
        h, w = x.shape[-2:]
        if min(h, w) < size:
            raise ValueError(f"sample image {name!r} is {h}x{w}, smaller than {size}")
        top, left = (h - size) // 2, (w - size) // 2
        images.append(BenchmarkImage(name, x[:, top : top + size, left : left + size].contiguous()))
    return images


def phantom_image(channels: int, size: int = DEMO_SIZE) -> Any:
    """scikit-image's Shepp-Logan phantom, ``size`` x ``size``, in [0, 1], as a :class:`~benchmarks.harness.BenchmarkImage`.

    ``channels`` 1: ``(1, size, size)``; 2 (complex MRI images): the phantom as the real part, zero imaginary part.
    """
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    from benchmarks.harness import BenchmarkImage

    pixels = np.clip(resize(shepp_logan_phantom(), (size, size), anti_aliasing=True), 0.0, 1.0).astype(np.float32)
    x = torch.from_numpy(pixels)[None]
    if channels == 2:
        x = torch.cat([x, torch.zeros_like(x)])
    elif channels != 1:
        raise ValueError(f"the phantom has 1 or 2 (complex) channels, not {channels}")
    return BenchmarkImage("shepp_logan", x.contiguous())


def run_case(case: DemoCase, out: Path, device: torch.device, seed: int = 0, progress: bool = True,
             precision: str = "fp32") -> list[dict[str, Any]] | None:  # fmt: skip
    """Run the shipped model for ``case`` (in ``precision``, :mod:`idm.precision`) and the pseudo-inverse;
    ``None`` when no shipped model serves it."""
    import tasks
    from benchmarks.harness import RESULT_FIELDS, run_benchmark
    from benchmarks.idm_method import IDMMethod
    from benchmarks.pinv import PseudoInverse
    from benchmarks.protocol import operator_factory, pad_multiple, score_function
    from benchmarks.report import write_results_csv
    from idm.shipped import find_shipped
    from idm.train import load_trained

    task = tasks.get(case.task)
    request = {"name": task.operator, **task.operator_kwargs(**case.overrides)}
    shipped = find_shipped(task.name, request, task.channels)
    if shipped is None:
        return None
    if shipped.color and shipped.color != task.color:
        task = task.with_color(shipped.color)
    trained = load_trained(shipped.path, expect_task=task.name, expect_operator=dict(case.overrides), device=device,
                           operator_defaults=task.operator_kwargs())  # fmt: skip
    images = [phantom_image(task.channels)] if case.images == "phantom" else sample_images(task.color)
    operator_for = operator_factory(task, dict(case.overrides), trained.operator, seed)
    first = operator_for(0, tuple(images[0].x.shape[-2:]))
    rows = run_benchmark(
        images,
        [PseudoInverse(), IDMMethod(trained.model.to(device), precision=precision)],
        operator_for,
        score_function(task),
        display=lambda x: task.metric_image(x),
        device=device,
        out=out / case.label,
        seed=seed,
        pad_multiple=pad_multiple(task, first),
        progress=progress,
        measure_memory=False,  # the table shows none; on the CPU it would run IDM a second time per image
    )
    for row in rows:
        row.update(case=case.label, model=shipped.name, color=task.color)
    write_results_csv(rows, out / case.label / "results.csv", ("case", "model", *RESULT_FIELDS))
    return rows


def demo_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: mean PSNR / SSIM / seconds per image for each case and method."""
    lines = ["| setting | model | method | PSNR (dB) | SSIM | seconds / image | images |", "|---|---|---|---|---|---|---|"]
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        seen.setdefault((row["case"], row["method"]), []).append(row)
    for (case, method), group in seen.items():
        ok = [r for r in group if r.get("status") == "ok"]
        mean: Callable[[str, int], str] = lambda key, digits: f"{np.mean([r[key] for r in ok]):.{digits}f}" if ok else "-"  # noqa: E731
        lines.append(
            f"| {case} | {group[0]['model']} ({group[0]['color']}) | {method} | {mean('psnr', 2)} | {mean('ssim', 4)} | "
            f"{mean('seconds', 3)} | {len(ok)}/{len(group)} |"
        )
    return "\n".join(lines)


def stack_pictures(paths: list[Path], out: Path) -> None:
    """Stack PNGs vertically (white background, left-aligned) into one PNG."""
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") for p in paths]
    width = max(p.width for p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height for p in pictures)), "white")
    top = 0
    for picture in pictures:
        canvas.paste(picture, (0, top))
        top += picture.height
    canvas.save(out)


def run_demo(out: str | Path, device: torch.device, seed: int = 0, progress: bool = True, say: Callable[[str], None] = print,
             precision: str = "fp32") -> str:  # fmt: skip
    """Run every case that a shipped model serves, IDM in ``precision``; write the files listed in the module docstring.

    Returns the markdown table. Raises ``ValueError`` when no shipped model is installed at all.
    """
    from idm.hardware import hardware_name

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the demo writes a folder")
    own = {case.label for case in DEMO_CASES} | {"demo.png", "demo.md"}
    others = sorted(p.name for p in out.iterdir() if p.name not in own and not p.name.startswith(".")) if out.is_dir() else []
    if others:  # an earlier demo's folder (also one stopped part-way) is written again; a folder of your own is not
        raise ValueError(f"--out {out} holds files the demo does not write ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}): give a new or empty folder, or an earlier demo's")  # fmt: skip
    rows: list[dict[str, Any]] = []
    grids: list[Path] = []
    skipped = []
    for case in DEMO_CASES:
        say(f"idm demo: {case.label}")
        case_rows = run_case(case, out, device, seed, progress, precision)
        if case_rows is None:
            skipped.append(case.label)
            continue
        rows += case_rows
        first = case_rows[0]["image"]
        grids.append(out / case.label / "grids" / f"{first}.png")
    if not rows:
        raise ValueError("no shipped model is installed (idm/weights is empty): nothing to demonstrate")
    stack_pictures([g for g in grids if g.is_file()], out / "demo.png")
    table = demo_table(rows)
    text = (
        f"# idm demo\n\nShipped models on scikit-image's sample images ({', '.join(SAMPLE_IMAGES)}; "
        f"centre {DEMO_SIZE}x{DEMO_SIZE} crops; its Shepp-Logan phantom for MRI and CT), seed {seed}, "
        f"{hardware_name(device)}, IDM in {precision}. CS: the authors' protocol (Y channel, PSNR peak 255); the other tasks: "
        "[0, 1] images (MRI: magnitude).\n\n" + table + "\n"
        + (f"\nNo shipped model for: {', '.join(skipped)}.\n" if skipped else "")
        + f"\nTotal time (loading, measuring, reconstructing, pictures): {time.perf_counter() - started:.0f} s.\n"
    )
    (out / "demo.md").write_text(text)
    return text
