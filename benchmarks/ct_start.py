"""Why a CT IDM trains from the settings of the ``ct`` task: the three measurements behind them.

    python -m benchmarks.ct_start --data ../shared/data/ct/test/npy_hu --limit 2 --size 256 \\
        --prior prior-natural-y --out benchmarks/results/cpu/ct-start

For 60 views (``--views``) at ``--size``:

1. ``||I - FBP A||`` (power iteration from a seeded random image) with deepinv's bare ramp
   filter and with the Hann window, and each FBP's PSNR on the test slices. IDM's step
   ``x0 + A^+ (y - A x0)`` multiplies errors of ``x0`` by up to this norm.
2. The PSNR of the ``A^+ y`` the network sees, mapped back to [0, 1], for
   ``IDMConfig.pinv_mapping`` ``"measurements"`` (``A^+ (2 y - A 1)``) and ``"images"``
   (``2 A^+ y - 1``).
3. The PSNR of an *untrained* IDM on the prior (``--prior``) for ``alpha_init`` 0.5 (the
   authors') and 0.99 (the ct task's default).

Writes ``OUT/ct_start.md`` and ``OUT/ct_start.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.report import run_script
from idm.cli.common import positive_int, seed_value
from idm.hardware import hardware_name


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((x_hat.clamp(0, 1) - x) ** 2).mean()))


def _amplification(op, size: int, iters: int = 30) -> float:
    v = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    gain = 0.0
    for _ in range(iters):
        u = v - op.A_dagger(op.A(v))
        gain, v = float(u.norm() / v.norm()), u / u.norm()
    return gain


def main(argv: list[str] | None = None) -> int:
    import operators
    import tasks
    from benchmarks.harness import load_images
    from benchmarks.report import script_command
    from idm import IDM, IDMConfig
    from idm.checkpoint import save_json
    from idm.shipped import find_prior

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, nargs="+", help="CT slices (.npy in HU, .dcm, .tif)")
    parser.add_argument("--limit", type=positive_int, default=2, help="slices used (default 2)")
    parser.add_argument("--size", type=positive_int, default=256, help="resize the slices to SIZE x SIZE (default 256)")
    parser.add_argument("--views", type=positive_int, default=60)
    parser.add_argument("--prior", default="prior-natural-y", help="prior folder or shipped prior name")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    task = tasks.get("ct")
    images = load_images(task, args.data, args.limit, size=args.size)
    record: dict = {"command": script_command("benchmarks.ct_start", argv),
                    "hardware": hardware_name(torch.device("cpu")),  # it runs on the CPU
                    "images": [im.name for im in images], "filters": {}, "pinv_mapping": {}, "alpha_init": {}}
    for kind in ("ramp", "hann"):
        op = operators.make("ct", img_size=(args.size, args.size), views=args.views, fbp_filter=kind)
        record["filters"][kind] = {
            "norm_I_minus_FBP_A": _amplification(op, args.size),
            "fbp_psnr": [_psnr(op.A_dagger(op.A(im.x[None])), im.x[None]) for im in images],
        }
    op = task.make_operator((args.size, args.size), views=args.views)
    prior = find_prior(args.prior) or args.prior
    for mapping in ("measurements", "images"):
        model = IDM(IDMConfig(unet=str(prior), steps=3, pinv_mapping=mapping))
        record["pinv_mapping"][mapping] = [
            _psnr((model.prior_range_pinv(op.A(im.x[None]), op) + 1) / 2, im.x[None]) for im in images
        ]
    for alpha in (0.5, 0.99):
        torch.manual_seed(args.seed)
        model = IDM(IDMConfig(unet=str(prior), steps=3, pinv_mapping="images", alpha_init=alpha)).eval()
        with torch.no_grad():
            record["alpha_init"][str(alpha)] = [_psnr(model(op.A(im.x[None]), op), im.x[None]) for im in images]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(record, out / "ct_start.json")
    fmt = lambda values: " / ".join(f"{v:.2f}" for v in values)  # noqa: E731
    lines = [f"# CT start: {args.views} views, {args.size}x{args.size}, {', '.join(record['images'])}", "",
             f"`{record['command']}` on {record['hardware']}", "", "| measurement | value |", "|---|---|"]
    for kind, r in record["filters"].items():
        lines.append(f"| `||I - FBP A||`, {kind} filter | {r['norm_I_minus_FBP_A']:.3f} |")
        lines.append(f"| FBP PSNR (dB), {kind} filter | {fmt(r['fbp_psnr'])} |")
    for mapping, values in record["pinv_mapping"].items():
        lines.append(f"| network's `A^+ y` PSNR (dB), pinv_mapping={mapping} | {fmt(values)} |")
    for alpha, values in record["alpha_init"].items():
        lines.append(f"| untrained IDM PSNR (dB), alpha_init={alpha} | {fmt(values)} |")
    text = "\n".join(lines) + "\n"
    (out / "ct_start.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.ct_start"))
