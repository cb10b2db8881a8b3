"""``idm pretrain``: train a pixel-space diffusion prior (diffusers ``UNet2DModel``, DDPM, epsilon).

    idm pretrain --data DIR [DIR ...] --out runs/prior --channels 1 --crop 64 --iters 20000
    # prior: runs/prior/prior  (idm train --prior runs/prior, IDMConfig(unet=...), diffusers pipelines)
"""

from __future__ import annotations

import argparse

from idm.cli.common import (
    add_common_args,
    add_micro_batch_arg,
    add_run_control_args,
    add_training_precision_arg,
    check_out_is_not_data,
    command_line,
    command_started_at,
    resolve_device,
    seed_everything,
)

DATA_KINDS = ("images", "mat", "ct")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train a diffusion prior (UNet2DModel) on your images",
        description="Train a noise estimator (diffusers UNet2DModel, epsilon prediction, 1000-step linear DDPM "
        "schedule) on random crops; the prior (EMA weights) is exported to OUT/prior at every checkpoint, "
        "loadable by `idm train --prior OUT`, IDMConfig(unet=OUT/prior) and diffusers (UNet2DModel, DDPMScheduler, "
        "DDPMPipeline). Resumable (--resume), time-budgeted (--max-minutes), multi-GPU under torchrun.",
    )
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="training data folders/files")
    parser.add_argument("--data-kind", choices=DATA_KINDS, default="images", help="images (PNG/TIFF/JPEG/BMP; default; with --channels 1, folders of .mat files mix in, e.g. natural + MR), mat (MATLAB 2-D matrices in [0,1]), ct (.npy/.dcm/.tif slices)")
    add_common_args(parser, out_help="run folder (config.json, log.csv, checkpoints/, prior/)")

    arch = parser.add_argument_group("U-Net")
    arch.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (default 1)")
    arch.add_argument("--color", choices=("gray", "y", "rgb"), help="colour mode of image files (default: gray for 1 channel, rgb for 3)")
    arch.add_argument("--width", type=int, default=64, help="channels of the first scale (default 64: 64/128/256)")
    arch.add_argument("--levels", type=int, default=3, help="number of scales (default 3)")
    arch.add_argument("--layers-per-block", type=int, default=2, help="resnets per scale (default 2)")
    arch.add_argument("--no-attention", action="store_true", help="no self-attention at the lowest scale")

    opt = parser.add_argument_group("training")
    opt.add_argument("--crop", type=int, default=64, help="square training crop (default 64)")
    opt.add_argument("--iters", type=int, default=20_000, help="total iterations (default 20000)")
    opt.add_argument("--batch-size", type=int, default=16, help="global batch size (default 16)")
    opt.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    opt.add_argument("--lr-milestones", type=int, nargs="+", default=(), metavar="ITER", help="iterations after which the lr is multiplied by --lr-gamma (default: none)")
    opt.add_argument("--lr-gamma", type=float, default=0.5, help="lr factor at each milestone (default 0.5)")
    opt.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the exported weights; 0 = no EMA (default 0.999)")
    opt.add_argument("--no-augment", action="store_true", help="no random flip/rotation per batch")
    add_training_precision_arg(opt)
    add_micro_batch_arg(opt)
    opt.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default 2)")

    add_run_control_args(parser, log_every=50, checkpoint_what="checkpoints and prior exports")
    parser.set_defaults(run=run_pretrain)


def _dataset(args: argparse.Namespace, color: str):
    from tasks.data import CTSliceDataset, ImageFolderDataset, MatFolderDataset, grayscale_dataset

    if args.data_kind == "images" and args.channels == 1:
        return grayscale_dataset(args.data, color=color, crop=args.crop, seed=args.seed)
    if args.data_kind == "images":
        return ImageFolderDataset(args.data, color=color, crop=args.crop, augment=False, seed=args.seed)
    if args.channels != 1:
        raise ValueError(f"--data-kind {args.data_kind} gives 1-channel images; use --channels 1")
    if args.color is not None:
        raise ValueError(f"--color sets how image files are read; --data-kind {args.data_kind} reads no image files")
    if args.data_kind == "mat":
        return MatFolderDataset(args.data, crop=args.crop, augment=False, seed=args.seed)
    return CTSliceDataset(args.data, crop=args.crop, augment=False, seed=args.seed)


def run_pretrain(args: argparse.Namespace) -> int:
    started_at = command_started_at("pretrain")
    from idm.pretrain import PretrainConfig, PriorArchitecture, pretrain
    from idm.training.distributed import detect

    env = detect()
    say = print if env.is_main else (lambda message: None)
    color = args.color or ("gray" if args.channels == 1 else "rgb")
    if (color == "rgb") != (args.channels == 3):
        raise ValueError(f"--color {color} does not give {args.channels} channel(s)")
    if args.crop < 1:
        raise ValueError(f"--crop must be positive, got {args.crop}")
    check_out_is_not_data(args.out, *args.data)
    arch = PriorArchitecture(
        channels=args.channels,
        width=args.width,
        levels=args.levels,
        layers_per_block=args.layers_per_block,
        attention=not args.no_attention,
        sample_size=args.crop,
    )
    if args.crop % arch.downsampling:
        raise ValueError(f"--crop {args.crop} must be a multiple of {arch.downsampling} for --levels {args.levels}")
    config = PretrainConfig(
        iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_milestones=tuple(args.lr_milestones),
        lr_gamma=args.lr_gamma,
        ema_decay=args.ema_decay,
        seed=args.seed,
        precision=args.precision,
        augment=not args.no_augment,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        keep=args.keep,
        max_minutes=args.max_minutes,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        micro_batch=args.micro_batch,
    )
    device = resolve_device(args.device)
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest convolutions
    seed_everything(args.seed)
    dataset = _dataset(args, color)
    result, prior = pretrain(
        arch,
        dataset,
        args.out,
        config,
        data_info={"color": color if args.data_kind == "images" else args.data_kind, "crop": args.crop},
        resume=args.resume,
        device=device,
        started_at=started_at,
        env=env,
        settings={
            "data": [str(p) for p in args.data],
            "data_kind": args.data_kind,
            "command": command_line("pretrain"),
        },
        say=say,
    )
    if result.finished:
        say(
            f"idm pretrain: done, {result.iteration} iterations ({result.iterations_per_second:.2f} it/s); "
            f"prior in {prior} (idm train --prior {args.out})"
        )
    else:
        why = "the time budget (--max-minutes)" if result.reason == "time" else "a stop signal"
        say(
            f"idm pretrain: stopped by {why} after iteration {result.iteration} of {args.iters} "
            f"({result.chunk_iterations} this run at {result.iterations_per_second:.2f} it/s); "
            f"prior (so far) in {prior}; run again with --resume to continue"
        )
    return 0
