"""``idm train``: fine-tune an IDM end to end for a task (resumable, multi-GPU under torchrun).

    idm train --task cs --ratio 0.1 --data DIR [DIR ...] --prior PRIOR --steps 3 \\
              --iters 50000 --batch-size 8 --crop 256 --lr 1e-4 --out runs/cs10 [--resume]
    torchrun --nproc_per_node=4 -m idm train ...      # DistributedDataParallel, same options
"""

from __future__ import annotations

import argparse
import dataclasses

from idm.cli.common import (
    add_common_args,
    add_micro_batch_arg,
    add_operator_args,
    add_run_control_args,
    add_training_precision_arg,
    check_out_is_not_data,
    command_line,
    command_started_at,
    crop_size,
    operator_overrides,
    positive_int,
    resolve_device,
    seed_everything,
)

def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune an IDM end to end for a task",
        description="Fine-tune an IDM end to end (L1 loss, Adam, step learning rate, one flip/rotation per batch, "
        "a fresh operator draw per iteration). Writes OUT/config.json, OUT/log.csv and atomic checkpoints in "
        "OUT/checkpoints/; --resume continues exactly. Under torchrun it trains with DistributedDataParallel.",
    )
    import tasks

    parser.add_argument("--task", required=True, help=f"task: {', '.join(tasks.available())} (tasks/<name>.py, or an idm.tasks entry point)")
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="training data folders/files (mri: also fully sampled fastMRI .h5 files)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prior", metavar="DIR", help="diffusers U-Net folder: an `idm pretrain` output, SD v1.5 (its folder or its unet/), or a shipped prior's name")
    source.add_argument("--unet", choices=("tiny", "sd15"), help="random-initialised built-in architecture instead of a prior (tiny: tests)")
    source.add_argument("--init-from", metavar="MODEL", help="start from a trained IDM of this task (model folder, training --out, or a shipped model's name): its architecture and weights, a fresh optimizer; --steps, --invertible, --no-injectors, --init, --pinv-mapping and --alpha-init do not apply")
    add_common_args(parser, out_help="run folder (config.json, log.csv, checkpoints/)")
    add_operator_args(parser, training=True)

    model = parser.add_argument_group("model")
    model.add_argument("--steps", type=int, help="sampling steps T (default 3)")
    model.add_argument("--invertible", choices=("none", "steps", "both"), help="wiring (default both)")
    model.add_argument("--no-recompute", action="store_true", help="plain autograd instead of the memory-saving backward")
    model.add_argument("--keep-attention", action="store_true",
                       help="with --invertible both and the memory-saving backward: the wired U-Net blocks keep their "
                            "attention products for the backward instead of recomputing them (faster; more memory: "
                            "Q, K, V and the output of every attention layer of one step). May change on --resume")  # fmt: skip
    model.add_argument("--no-injectors", action="store_true", help="no measurement injectors")
    model.add_argument("--init", choices=("pinv", "noise"), help="x_T: sqrt(abar_T) A^+ y (default) or noise")
    model.add_argument("--pinv-mapping", choices=("measurements", "images"),
                       help="A^+ y in the prior's [-1, 1] range: A^+(2y - A1) or 2 A^+ y - 1 (default: the task's; "
                       "'images' for ct, whose FBP turns the constant image into streaks)")
    model.add_argument("--final-projection", action=argparse.BooleanOptionalAction, default=None,
                       help="project the output onto the measurements, x + A^+(y - A x) (no parameters; default: "
                       "the task's, on for cs and ct, whose approximate A^+ is replaced there by CG least squares; "
                       "with --init-from, the model's)")
    model.add_argument("--separate-channels", action=argparse.BooleanOptionalAction, default=None,
                       help="run the U-Net on each colour channel as a grey image (a grey prior on RGB; default: the "
                       "task's, on for inpainting); --no-separate-channels tiles it over the channels. With "
                       "--init-from a model of the other layout, its weights are converted (idm/channel_layout.py)")
    model.add_argument("--alpha-init", type=float,
                       help="initial learnable alpha, abar_t = alpha^t (default: the task's; 0.5 as the authors, "
                       "0.99 for mri and ct: the untrained network then returns about A^+ y instead of a poor first guess)")

    opt = parser.add_argument_group("training (defaults come from the task)")
    opt.add_argument("--iters", type=int, help="total iterations")
    opt.add_argument("--batch-size", type=int, help="global batch size (split over torchrun processes)")
    opt.add_argument("--crop", type=crop_size, nargs="+", metavar="S|HxW",
                     help="training crop, the operator's image size: a square S or height x width, e.g. 192x320 "
                     "(batches of a crop that is not square are flipped but never turned a quarter, so they keep "
                     "their shape); several sizes take turns, one per iteration (e.g. --crop 256 192x320: square "
                     "and wide images alike); default: the task's square")  # fmt: skip
    opt.add_argument("--color", choices=("gray", "y", "rgb"), help="colour mode of image files (cs, inpainting)")
    opt.add_argument("--lr", type=float, help="initial Adam learning rate")
    opt.add_argument("--lr-milestones", type=int, nargs="+", metavar="ITER", help="iterations after which the lr is multiplied by --lr-gamma (default: the task's fractions of --iters, 20/40/60/80%% for the built-in tasks)")
    opt.add_argument("--lr-gamma", type=float, default=0.5, help="lr factor at each milestone (default 0.5)")
    opt.add_argument("--scalar-lr-mult", type=float, default=1.0, help="lr factor for the learnable scalars: abar's alpha, wiring v, in/out scales (default 1 = the paper)")
    opt.add_argument("--ssim-weight", type=float, default=0.0, metavar="W", help="add W * (1 - SSIM) to the L1 loss, SSIM as the benchmarks measure it (on the MRI magnitude; default 0 = the paper's L1 alone)")
    opt.add_argument("--log-loss", action="store_true", help="minimise the mean over images of the log of each image's loss (as mean PSNR weighs them): "
                     "easy images and operators (a CS model's high ratios) count as much as hard ones; the logged loss is then negative")
    opt.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                     help="keep an exponential moving average of the weights (e.g. 0.99) and checkpoint it as the model "
                     "(reconstruct, benchmark, export and validation use it; --resume continues the raw weights); "
                     "default 0 = the last weights, as the paper")
    opt.add_argument("--no-augment", action="store_true", help="no random flip/rotation per batch")
    opt.add_argument("--random-phase", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                     help="mri: multiply each training image (or, with FRACTION, that share of them, drawn per image) "
                     "by a random smooth phase, so that a model trained on magnitude images also reconstructs real "
                     "k-space (whose images have phase); default off, the flag alone: every image")
    opt.add_argument("--image-noise", type=float, default=0.0, metavar="SIGMA",
                     help="add Gaussian noise to each training image before its measurements are simulated (the "
                     "target too), its standard deviation drawn per image in [0, SIGMA] (image units: 0.02 is 2 %% "
                     "of full scale), so that a model trained on clean images also serves noisy scanner data; default 0")
    opt.add_argument("--fixed-operator", action="store_true", help="keep one operator draw instead of a fresh one per iteration")
    add_training_precision_arg(opt)
    add_micro_batch_arg(opt)
    opt.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default 2)")

    run = add_run_control_args(parser, log_every=10)
    run.add_argument("--val-data", nargs="+", metavar="DIR", help="a few validation images (centre-cropped to --crop, the first of several sizes)")
    run.add_argument("--val-every", type=int, default=0, help="iterations between validations (default: at checkpoints)")
    run.add_argument("--val-max", type=positive_int, default=16, help="at most this many validation images (default 16)")
    parser.set_defaults(run=run_train)


def _starting_model(args: argparse.Namespace, task):
    """The trained IDM named by ``--init-from``, checked against the task (same task, same channels)."""
    from idm.checkpoint import CheckpointError
    from idm.train import load_trained

    trained = load_trained(args.init_from, expect_task=task.name)
    channels = trained.model.config.image_channels
    if channels != task.channels:
        raise CheckpointError(
            f"--init-from {args.init_from}: the model takes {channels}-channel images, task {task.name} "
            f"({task.color}) gives {task.channels}"
        )
    return trained.model


def _crop_hw(crop: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a ``--crop`` value (a square side or a pair)."""
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


def _crop_text(crop: int | tuple[int, int]) -> str:
    """A ``--crop`` value as it is written on the command line: ``256`` or ``192x320``."""
    return str(crop) if isinstance(crop, int) else f"{crop[0]}x{crop[1]}"


def _crop_record(crops: list) -> int | list:
    """What ``run.json`` records of ``--crop``: one size as before (``256`` or ``[192, 320]``), several as a list
    of ``[height, width]`` pairs (a list of lists, never read as one size)."""
    if len(crops) == 1:
        crop = crops[0]
        return crop if isinstance(crop, int) else list(_crop_hw(crop))
    return [list(_crop_hw(c)) for c in crops]


def _training_operator(task, crop: int | tuple[int, int], args: argparse.Namespace):
    """The task's training operator for images of one ``--crop`` size; a crop smaller than a CS block is refused."""
    height, width = _crop_hw(crop)
    operator = task.make_training_operator((height, width), seed=args.seed, **operator_overrides(args))
    block = getattr(operator, "representative", operator).config().get("block")
    if block and min(height, width) < block:  # the operator would then measure a whole crop as one padded block
        raise ValueError(f"--crop {_crop_text(crop)} is smaller than one {block}x{block} block of the cs operator: "
                         f"train on crops of at least {block}x{block} pixels")  # fmt: skip
    return operator


def run_train(args: argparse.Namespace) -> int:
    started_at = command_started_at("train")
    import tasks
    from idm.config import IDMConfig
    from idm.pretrain import prior_folder
    from idm.train import TrainConfig, train
    from idm.training.distributed import detect

    env = detect()
    say = print if env.is_main else (lambda message: None)
    if args.prior is None and args.unet is None and args.init_from is None:
        raise ValueError(
            "give --prior DIR (a diffusers U-Net folder), --unet tiny|sd15 (random initialisation) "
            "or --init-from MODEL (a trained IDM)"
        )
    task = tasks.get(args.task)
    if args.color is not None:
        task = task.with_color(args.color)
    if args.init_from:
        architecture = {"--steps": args.steps, "--invertible": args.invertible, "--no-injectors": args.no_injectors or None,
                        "--init": args.init, "--pinv-mapping": args.pinv_mapping, "--alpha-init": args.alpha_init}  # fmt: skip
        given = [flag for flag, value in architecture.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set the architecture of a new model; --init-from {args.init_from} "
                             "keeps the trained model's (start from --prior or --unet to choose them)")  # fmt: skip
    start = _starting_model(args, task) if args.init_from else None
    sched = task.schedule
    iters = args.iters if args.iters is not None else sched.iters
    crops = args.crop if args.crop is not None else [task.crop]
    if len(set(crops)) < len(crops):
        raise ValueError(f"--crop names a size twice ({' '.join(map(_crop_text, crops))}); give each size once")
    milestones = tuple(args.lr_milestones) if args.lr_milestones else sched.milestone_iterations(iters)
    config = TrainConfig(
        iters=iters,
        batch_size=args.batch_size if args.batch_size is not None else sched.batch_size,
        lr=args.lr if args.lr is not None else sched.lr,
        lr_milestones=milestones,
        lr_gamma=args.lr_gamma,
        scalar_lr_mult=args.scalar_lr_mult,
        ssim_weight=args.ssim_weight,
        log_loss=args.log_loss,
        ema_decay=args.ema_decay,
        random_phase=args.random_phase,
        image_noise=args.image_noise,
        seed=args.seed,
        precision=args.precision,
        augment=not args.no_augment,
        randomize_operator=task.randomized and not args.fixed_operator,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        val_every=args.val_every,
        keep=args.keep,
        max_minutes=args.max_minutes,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        micro_batch=args.micro_batch,
    )
    if start is not None:
        final_projection = start.config.final_projection if args.final_projection is None else args.final_projection
        separate = start.config.separate_channels if args.separate_channels is None else args.separate_channels
        model_config = dataclasses.replace(
            start.config, recompute=not args.no_recompute, final_projection=final_projection, separate_channels=separate,
            keep_attention=args.keep_attention,
        )
    else:
        chosen = {"pinv_mapping": args.pinv_mapping, "alpha_init": args.alpha_init,
                  "final_projection": args.final_projection, "separate_channels": args.separate_channels}  # fmt: skip
        model_config = IDMConfig(
            unet=prior_folder(args.prior) if args.prior else args.unet,
            steps=args.steps if args.steps is not None else 3,
            invertible=args.invertible or "both",
            recompute=not args.no_recompute,
            keep_attention=args.keep_attention,
            injectors=not args.no_injectors,
            init=args.init or "pinv",
            **{**task.model_defaults(), **{k: v for k, v in chosen.items() if v is not None}},
        )
    if model_config.keep_attention and not (model_config.invertible == "both" and model_config.recompute):
        raise ValueError("--keep-attention applies to the wired U-Net blocks' memory-saving backward: it needs "
                         "--invertible both (the model's wiring) and no --no-recompute")  # fmt: skip
    device = resolve_device(args.device)
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest convolutions
    seed_everything(args.seed)
    operators = [_training_operator(task, c, args) for c in crops]
    check_out_is_not_data(args.out, *args.data, *(args.val_data or []))
    datasets = [task.dataset(args.data, crop=c, augment=False, seed=args.seed) for c in crops]
    if not args.val_data and args.val_every:
        raise ValueError("--val-every sets how often to validate on --val-data, which is not given")
    val = task.dataset(args.val_data) if args.val_data else None
    result = train(
        model_config,
        datasets[0],
        operators[0],
        args.out,
        config,
        task=task.name,
        task_info={"color": task.color, "crop": _crop_record(crops), "channels": task.channels},
        val_dataset=val,
        val_limit=args.val_max,
        init_model=start,
        metric_transform=task.metric_image,
        resume=args.resume,
        device=device,
        started_at=started_at,
        env=env,
        settings={
            "data": [str(p) for p in args.data],
            "val_data": [str(p) for p in args.val_data or []],
            "prior": model_config.unet,
            "init_from": args.init_from,
            "command": command_line("train"),
            **({"task_package": package} if (package := tasks.provider(task.name)) else {}),  # what a plug-in needs
        },
        more_sizes=list(zip(datasets[1:], operators[1:])),
        say=say,
    )
    where = result.checkpoint or args.out
    if result.loop.reason == "done" and result.finished:
        if result.resumed_from >= iters:
            say(f"idm train: the run in {args.out} already reached {result.iteration} iterations (--iters {iters}); nothing to do")
        else:
            say(
                f"idm train: done, {result.iteration} iterations ({result.loop.iterations_per_second:.2f} it/s); "
                f"model in {where} (use --checkpoint {args.out})"
            )
    else:
        why = "the time budget (--max-minutes)" if result.loop.reason == "time" else "a stop signal"
        say(
            f"idm train: stopped by {why} after iteration {result.iteration} of {iters} "
            f"({result.loop.chunk_iterations} this run at {result.loop.iterations_per_second:.2f} it/s, "
            f"{result.loop.seconds:.0f} s of training in all); "
            f"checkpoint {where}; run again with --resume to continue"
        )
    return 0
