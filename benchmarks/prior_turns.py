"""How a diffusion prior denoises each image as it is and turned a quarter: does the U-Net alone prefer a shape?

    python -m benchmarks.prior_turns --prior prior-natural-y --data IMG [IMG ...] [--task cs] \\
                                     [--timesteps 50 200 500] [--square] --out FOLDER

For each image ``x`` (read as ``--task`` reads it, default cs: the Y
channel, in [0, 1]) and each timestep ``t``, the prior's one-step estimate
of the clean image from ``x_t = sqrt(abar_t) x_model + sqrt(1 - abar_t)
eps`` (``x_model`` in the prior's range, ``eps`` drawn with seed ``--seed``
plus the image index, the same for both) is scored as it is and with the
noisy image turned a quarter before the U-Net and the estimate turned back:

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t),  eps_hat = T^{-1} unet(T x_t, t)

A U-Net that treated height and width alike would score the same both ways.
This is the IDM models' preference for tall images (``benchmarks/RESULTS.md``,
*Wide images turned tall*) looked for in the prior alone: no operator, no
injectors, no fine-tuning. ``--square`` first crops each image to its
top-left square (where turning changes no shape). PSNR on the images in
[0, 1], the estimate clipped to that range. Writes ``FOLDER/turns.csv`` (one
row per image and timestep) and ``FOLDER/turns.md`` (the means), fp32.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.harness import load_images
from benchmarks.prior import load_prior
from benchmarks.report import rounded, run_script, script_command, write_csv_and_markdown
from idm.cli.common import add_common_args, non_negative_int, resolve_device
from idm.ensemble import QUARTER_TURN
from idm.hardware import hardware_name
from idm.metrics import psnr

FIELDS = ("image", "timestep", "psnr_as_is", "psnr_turned")


def denoised(prior, x: torch.Tensor, t: int, eps: torch.Tensor, turned: bool) -> torch.Tensor:
    """The prior's one-step estimate of ``x`` ``(1, C, H, W)`` in [0, 1] from its noisy version at ``t`` with
    noise ``eps`` (prior space), the U-Net run on the image turned a quarter when ``turned``; in [0, 1], clipped.

    A size that is not a multiple of the U-Net's downsampling is padded (replicate, bottom and right) before
    the turn, so both ways the U-Net sees the same padded image, once turned."""
    abar = prior.abar(t, x)
    x_t = abar.sqrt() * prior.space.to_model(x) + (1 - abar).sqrt() * eps
    height, width = x_t.shape[-2:]
    padded = prior.padded(x_t)
    if turned:
        eps_hat = QUARTER_TURN.invert(prior.eps(QUARTER_TURN.apply(padded), t))
    else:
        eps_hat = prior.eps(padded, t)
    x0 = (x_t - (1 - abar).sqrt() * eps_hat[..., :height, :width]) / abar.sqrt()
    return prior.space.to_image(x0).clamp(0, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", required=True, help="prior folder, `idm pretrain` run, or shipped prior's name")
    parser.add_argument("--data", nargs="+", required=True, help="images")
    parser.add_argument("--task", default="cs", help="the task whose image format to read (default cs: the Y channel)")
    parser.add_argument("--timesteps", type=non_negative_int, nargs="+", default=[50, 200, 500],
                        help="diffusion timesteps, 0-999 (default 50 200 500)")  # fmt: skip
    parser.add_argument("--square", action="store_true", help="crop each image to its top-left square first")
    add_common_args(parser)
    args = parser.parse_args(argv)
    bad = [t for t in args.timesteps if t > 999]
    if bad:
        parser.error(f"--timesteps must be in 0-999, got {bad}")
    return run_script(lambda _: _run(args, argv), "benchmarks.prior_turns")


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import tasks

    device = resolve_device(args.device)
    prior = load_prior(args.prior, device=device, dtype=torch.float32)
    rows = []
    for index, image in enumerate(load_images(tasks.get(args.task), args.data, seed=args.seed)):
        x = image.x[None].to(device)
        if args.square:
            side = min(x.shape[-2:])
            x = x[..., :side, :side]
        prior.check_images(tuple(x.shape))
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed + index)).to(device)
        with torch.no_grad():
            for t in args.timesteps:
                scores = [psnr(denoised(prior, x, t, eps, turned)[0], x[0]) for turned in (False, True)]
                rows.append({"image": image.name, "timestep": t, "psnr_as_is": scores[0], "psnr_turned": scores[1]})
    lines = []
    for t in args.timesteps:
        own = [r for r in rows if r["timestep"] == t]
        as_is, turned = (statistics.fmean(r[k] for r in own if math.isfinite(r[k])) for k in FIELDS[2:])
        lines.append(f"| {t} | {as_is:.2f} | {turned:.2f} | {turned - as_is:+.2f} |")
    markdown = (f"`{script_command('benchmarks.prior_turns', argv)}` on {hardware_name(device)}\n\n"
                "| timestep | PSNR as it is (dB) | turned a quarter (dB) | difference |\n|---|---|---|---|\n"
                + "\n".join(lines) + "\n")  # fmt: skip
    write_csv_and_markdown(Path(args.out), "turns", rounded(rows), FIELDS, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
