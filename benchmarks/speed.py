"""Inference and training speed of IDM: ms/image, s/iteration, achieved TFLOP/s and percent of peak.

    python -m benchmarks.speed --device cuda --unet sd15 --size 256 --batch 1 16 --precision fp32 bf16 \\
        --train-batch 8 --peak-tflops 790 --out benchmarks/results/h100-speed
    python -m benchmarks.speed --device cpu --checkpoint cs-10 mri-4x ct-60 --size 256 --batch 1 \\
        --levers channels_last --out benchmarks/results/cpu-speed      # shipped models on this CPU

Inference: ``model(y, op)`` under ``torch.no_grad``, median over ``--iters`` timed runs after
``--warmup``, for every batch size, precision (``fp32``, or ``bf16``
autocast with the wired states in float32) and lever (``base``,
``channels_last``, ``compile``: ``torch.compile`` of the noise estimator; ``cudagraphs``:
the whole ``model(y, op)`` captured once as a CUDA graph and replayed, CUDA only
(:func:`captured`); ``unfolded``: the
upsamplers as diffusers runs them, without :mod:`idm.unets.upsample`'s
low-resolution form, for comparison; ``sdpa-flash``, ``sdpa-efficient``,
``sdpa-cudnn``: attention restricted to that kernel of torch's); with ``--ensemble N``, the
test-time ensemble of N flipped and turned copies instead of ``model(y, op)``, for each of
``--members-per-call`` (copies of one image shape stacked into one call, :mod:`idm.ensemble`),
in ms per image of the batch. The operator is block CS (10%,
permuted, 32x32 blocks) for ``--unet``, and a checkpoint's own operator (its
recorded config at ``--size``, as ``idm benchmark`` rebuilds it; for a model
trained on a family, the family's first member) for ``--checkpoint``, so a
shipped model is timed with its own measurement injectors and final
projection. Training:
one iteration (forward, L1, backward, Adam) for the plain network
(``invertible="none"``) and the two-level wiring with the memory-saving
backward (``both``), at ``--train-batch``, for each of ``--train-levers``
(``base``, ``channels_last``, ``compile``, the attention kernels, ``cudagraphs``: the whole
iteration, backward and Adam step included, captured once as a CUDA graph and replayed,
:meth:`benchmarks.timing.TrainingSetup.captured_iteration`), and for each of
``--train-micro-batch`` (the batch's forward and backward run that many images at a
time, as ``idm train --micro-batch``).

FLOPs are counted once per configuration with
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; the
training count includes the backward's recomputation, see
:func:`training_flops`), so achieved TFLOP/s
= FLOPs / time, and percent of peak uses ``--peak-tflops`` (the device's
dense peak for the precision; left blank when not given). On the CPU, the
page-fault column counts the minor page faults of one more inference run
after the timed ones, and ``--malloc glibc`` times glibc's own allocator
against the kept freed memory that ``idm``'s commands set
(:mod:`idm.cpu_memory`). Writes ``OUT/speed.csv`` and ``OUT/speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

import operators
from benchmarks.report import (
    run_script,
    script_command,
    write_csv,
    write_csv_and_markdown,
)
from benchmarks.timing import (
    TrainingSetup,
    add_timing_args,
    captured,
    error_line,
    median_seconds,
    minor_page_faults,
    require_cuda_for_graphs,
    setup,
)
from idm import IDM, IDMConfig
from idm.checkpoint import CheckpointError
from idm.cli.common import non_negative_int, positive_int
from idm.ensemble import ENSEMBLE_SIZES, default_members_per_call, ensemble_reconstruct
from idm.hardware import hardware_name
from idm.precision import PRECISIONS
from idm.training.trained import resolve_model_dir

FIELDS = [
    "mode", "model", "operator", "variant", "precision", "lever", "batch", "micro_batch", "ensemble", "members_per_call",
    "size", "steps", "params_m",
    "ms_per_image", "s_per_iter", "gflop_per_image", "tflops", "percent_of_peak", "page_faults_per_image", "status",
]  # fmt: skip
#: Attention levers: scaled-dot-product attention restricted to one of torch's kernels (by default torch
#: picks one per call; on the H200 with torch 2.11 it picked cuDNN's for sd15's 40-wide heads).
ATTENTION_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
LEVERS = ("base", "channels_last", "compile", "cudagraphs", "unfolded", *ATTENTION_KERNELS)
TRAIN_LEVERS = ("base", "channels_last", "compile", "cudagraphs", *ATTENTION_KERNELS)
# torch.compile's guard-failure budget per function: the U-Net walk runs each wired group (ten in
# sd15) at every step, with the group's index and the step as constants, so every (group, step)
# is a graph of its own; dynamo's default of 8 would leave most of them to run eagerly.
COMPILE_RECOMPILE_LIMIT = 256


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    """FLOPs of PyTorch's CPU flash attention: the two matrix products, as for the CUDA kernels."""
    return sdpa_flop_count(query, key, value)


def _with_sparse_products(dense_formula: Callable[..., int]) -> Callable[..., int]:
    """A FLOP formula for ``mm``/``addmm`` that counts a sparse factor by its nonzeros, ``dense_formula`` otherwise."""

    def formula(*args, out_val=None, **kwargs) -> int:
        sparse = [a for a in args if isinstance(a, torch.Tensor) and a.layout != torch.strided]
        if not sparse:
            return dense_formula(*args, out_val=out_val, **kwargs)
        return 2 * int(sparse[0]._nnz()) * out_val.shape[-1]

    formula._get_raw = True  # FlopCounterMode passes the tensors, not their shapes
    return formula


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (2 per multiply-add), also counting attention on the CPU, and sparse products right.

    torch counts the CUDA attention kernels but not the CPU one
    (``_scaled_dot_product_flash_attention_for_cpu``), which would leave out the
    two ``N x N`` products of every self-attention. And it counts a sparse
    matrix times a dense one (CT's projector, :mod:`operators.symmetric_projector`)
    as if the sparse factor were dense: at 256x256 and 60 views, 3.1 GFLOP per
    product (16 stored views, four copies of the image) instead of 18 MFLOP.
    """
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    mapping.update({op: _with_sparse_products(flop_registry[op]) for op in (aten.mm, aten.addmm)})
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs of one call of ``run`` (see :func:`flop_counter`)."""
    counter = flop_counter()
    with counter:
        run()
    return counter.get_total_flops()


def training_flops(model: IDM, run: Callable[[], Any], forward: Callable[[], Any]) -> int:
    """FLOPs of one training iteration ``run``.

    torch's counter cannot follow the memory-saving backward (it runs
    autograd inside ``backward``), so for ``recompute=True`` the iteration is
    counted with plain autograd on the same network (identical arithmetic)
    plus one forward for the recomputation. That is a round figure: the
    backward recomputes every step but the last (whose graph the forward
    keeps) and, with ``invertible="both"``, every wired U-Net block once more.
    """
    if not model.config.recompute:
        return count_flops(run)
    config = model.config
    try:
        model.config = config.replace(recompute=False)
        plain = count_flops(run)
    finally:
        model.config = config
    with torch.no_grad():
        return plain + count_flops(forward)


def build_model(unet: str | None, checkpoint: str | None, steps: int, variant: str, size: int,
                device: torch.device) -> tuple[IDM, str, operators.Operator]:  # fmt: skip
    """``(model, label, operator)``: a trained IDM (a folder or a shipped model's name) with its own operator,
    or ``unet`` with random weights and block CS at 10 %, the operator at ``size x size``."""
    if checkpoint is not None:
        model, config = load_checkpoint(checkpoint, device)
        return model, Path(checkpoint).name, make_operator(config, size, model.config.image_channels)
    invertible, recompute = ("none", False) if variant == "none" else ("both", True)
    torch.manual_seed(0)
    model = IDM(IDMConfig(unet=unet or "sd15", image_channels=1, steps=steps, invertible=invertible, recompute=recompute))
    return model.to(device), unet or "sd15", make_operator(None, size, 1)


def load_checkpoint(checkpoint: str, device: torch.device) -> tuple[IDM, dict[str, Any] | None]:
    """``(model, operator config)``: a trained IDM and the config of the operator it serves by default
    (``None`` for a bare model folder without a run record)."""
    import tasks
    from idm.train import load_trained

    trained = load_trained(checkpoint, device=device)
    if trained.task is not None:  # a model trained on a family serves its first member with the task's defaults
        trained.operator_defaults = tasks.get(trained.task).operator_kwargs()
    return trained.model.to(device), trained.operator


def make_operator(config: dict[str, Any] | None, size: int, channels: int) -> operators.Operator:
    """The operator to time: ``config`` at ``size x size`` (seed 0), or block CS at 10 % when ``config`` is ``None``."""
    if config is None:
        return operators.make("cs", img_size=(size, size), channels=channels, ratio=0.1, mode="permuted")
    config = {**config, "img_size": [size, size]}
    if "seed" in config:
        config["seed"] = 0
    return operators.from_config(config)


def describe(op: operators.Operator) -> str:
    """``"cs ratio=0.1"``: the operator's name and its scalar settings other than sizes and seeds."""
    config, skip = op.config(), {"name", "img_size", "seed", "phi_seed", "channels"}
    settings = [f"{k}={v}" for k, v in config.items() if k not in skip and isinstance(v, (int, float, str)) and len(str(v)) <= 20]
    return " ".join([config["name"], *settings])


def _rate(row: dict, flops: int, seconds: float, peak: float | None) -> None:
    row["tflops"] = round(flops / seconds / 1e12, 3)
    row["percent_of_peak"] = round(100 * row["tflops"] / peak, 1) if peak else ""


def inference_row(model: IDM, label: str, op: operators.Operator, batch: int, size: int, precision: str, lever: str, device: torch.device,
                  iters: int, warmup: int, peak: float | None, ensemble: int = 1,
                  members_per_call: int | None = None) -> dict:  # fmt: skip
    """Time ``model(y, op)`` for one configuration; with ``ensemble`` > 1, the test-time ensemble of that many
    flipped and turned copies (:func:`idm.ensemble.ensemble_reconstruct`, ``members_per_call`` of one image
    shape stacked into one call; ``None``: the device's default), per image of the batch."""
    if ensemble > 1 and members_per_call is None:
        members_per_call = default_members_per_call(device)
    row = dict(mode="inference", model=label, operator=describe(op), variant=model.config.invertible,
               precision=precision, lever=lever, batch=batch, size=size, steps=model.config.steps)  # fmt: skip
    if ensemble > 1:
        row.update(ensemble=ensemble, members_per_call=members_per_call)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    x = torch.rand(batch, model.config.image_channels, size, size, device=device)
    y = op.A(x)
    model.eval()
    model.inference_precision = precision  # what for_inference(precision=) sets, without freezing the weights
    model = with_lever(model, lever)

    def run() -> torch.Tensor:
        with torch.no_grad():
            if ensemble > 1:
                return ensemble_reconstruct(model, y, op, ensemble, members_per_call=members_per_call)
            return model(y, op)

    flops = count_flops(run) if lever != "compile" else None
    if lever == "cudagraphs":
        run = captured(run, device)
    with lever_context(lever):
        seconds = median_seconds(run, device, iters, warmup)
    row["ms_per_image"] = round(1000 * seconds / batch, 2)
    if device.type == "cpu":
        row["page_faults_per_image"] = round(minor_page_faults(run) / batch)
    if flops:
        row["gflop_per_image"] = round(flops / batch / 1e9, 2)
        _rate(row, flops, seconds, peak)
    row["status"] = "ok"
    return row


def with_lever(model: IDM, lever: str) -> IDM:
    """``model`` with ``lever`` applied (``cudagraphs`` is applied to the call instead: :func:`captured`)."""
    if lever == "channels_last":
        return model.to(memory_format=torch.channels_last)
    if lever == "compile":
        model.eps_net = torch.compile(model.eps_net)  # the noise estimator: the U-Net walk with its injectors
    elif lever == "unfolded":  # the reference: diffusers' upsamplers at full resolution (idm.unets.upsample)
        model.eps_net.fold_upsamplers = False
    return model


def lever_context(lever: str) -> contextlib.AbstractContextManager:
    """What a lever needs around the timed calls: for ``compile``, dynamo's recompile limit raised to
    :data:`COMPILE_RECOMPILE_LIMIT` (it compiles at the first, untimed calls); for an attention lever
    (:data:`ATTENTION_KERNELS`), that kernel alone (a call it cannot serve is an error, recorded as the
    row's status); otherwise nothing."""
    if lever == "compile":
        return torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT)
    if lever in ATTENTION_KERNELS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, ATTENTION_KERNELS[lever]))
    return contextlib.nullcontext()


def training_row(model: IDM, label: str, op: operators.Operator, batch: int, size: int, precision: str, lever: str,
                 device: torch.device, iters: int, warmup: int, peak: float | None,
                 micro_batch: int | None = None) -> dict:  # fmt: skip
    """Time one training iteration (forward, L1, backward in pieces of ``micro_batch`` images, Adam step)."""
    row = dict(mode="train", model=label, operator=describe(op), variant=model.config.invertible, precision=precision,
               lever=lever, batch=batch, micro_batch=min(micro_batch or batch, batch), size=size,
               steps=model.config.steps)  # fmt: skip
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    graphed = lever == "cudagraphs"
    if graphed:
        require_cuda_for_graphs(device)  # before Adam is made capturable, which the CPU refuses
    training = TrainingSetup.for_model(model, op, batch, size, precision, lr=1e-6, capturable=graphed,
                                       micro_batch=micro_batch)  # fmt: skip
    flops = training_flops(model, training.iteration, lambda: model(training.y, op))  # before the lever: same count
    model = with_lever(model, lever)
    with lever_context(lever):
        run = training.captured_iteration() if graphed else training.iteration
        seconds = median_seconds(run, device, iters, warmup)
    row["s_per_iter"] = round(seconds, 4)
    row["gflop_per_image"] = round(flops / batch / 1e9, 2)
    _rate(row, flops, seconds, peak)
    row["status"] = "ok"
    return row


def summary_markdown(rows: list[dict]) -> str:
    shown = ["mode", "model", "operator", "variant", "precision", "lever", "batch", "micro_batch", "ensemble", "members_per_call",
             "ms_per_image", "s_per_iter", "gflop_per_image", "tflops", "percent_of_peak", "page_faults_per_image",
             "status"]  # fmt: skip
    shown = [k for k in shown if k not in ("ensemble", "members_per_call") or any(r.get(k) for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in shown) + " |" for r in rows]
    return "\n".join(lines)


def _guarded(make_row: Callable[[], dict], base: dict) -> dict:
    """``make_row()``, or ``base`` with the error as status (out of memory, a failed compile...)."""
    try:
        return make_row()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # noqa: PERF203
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        traceback.print_exc()  # where it broke (a capture, a compile), for the device log
        return {**base, "status": error_line(err, 120)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--unet", help="architecture with random weights: tiny, sd15 (default) or a diffusers U-Net folder")
    source.add_argument("--checkpoint", nargs="+",
                        help="trained IDMs: model/run folders or shipped models' names (inference only)")  # fmt: skip
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, help="T of the --unet models (default 3; a --checkpoint has its own)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 16], help="inference batch sizes")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"])
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=["base"])
    parser.add_argument("--train-batch", type=non_negative_int, default=0, help="also time training at this batch (0: no)")
    parser.add_argument("--train-levers", nargs="+", choices=TRAIN_LEVERS, default=["base"], help="levers of the training rows")
    parser.add_argument("--train-micro-batch", type=positive_int, nargs="+", metavar="N",
                        help="time training with each of these micro-batches (idm train --micro-batch; default: the "
                        "whole --train-batch at once)")  # fmt: skip
    parser.add_argument("--ensemble", type=int, choices=ENSEMBLE_SIZES, default=1, metavar="N",
                        help="time the inference rows as the test-time ensemble of N flipped and turned copies "
                        "(idm reconstruct --ensemble; 1, 2, 4 or 8; default 1: plain IDM)")  # fmt: skip
    parser.add_argument("--members-per-call", type=positive_int, nargs="+", metavar="K",
                        help="with --ensemble: time each of these numbers of copies of one image shape stacked into "
                        "one call (idm.ensemble; default: the device's, 4 on a GPU and 1 on the CPU)")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for the precision, for percent of peak")
    args = parser.parse_args(argv)
    if args.members_per_call and args.ensemble == 1:
        parser.error("--members-per-call sets how the copies of --ensemble run: give --ensemble 2, 4 or 8 too")
    if args.ensemble > 1 and set(args.levers) - {"base", "channels_last"}:
        parser.error("--ensemble is timed with the base and channels_last levers only")
    if args.train_micro_batch and not args.train_batch:
        parser.error("--train-micro-batch cuts the batch of the training rows: give --train-batch too")
    if args.checkpoint and (args.steps is not None or args.train_batch):
        parser.error("--steps and --train-batch are for --unet architectures; a --checkpoint is timed as trained, "
                     "in inference only")  # fmt: skip
    args.steps = 3 if args.steps is None else args.steps
    graphs = "cudagraphs" in args.levers or (args.train_batch and "cudagraphs" in args.train_levers)
    if graphs and not str(args.device).startswith("cuda"):
        parser.error("the cudagraphs lever needs a CUDA device (--device cuda)")
    for checkpoint in args.checkpoint or []:  # every name checked before the first timing
        try:
            resolve_model_dir(checkpoint)
        except CheckpointError as err:
            parser.error(str(err))
    device, out = setup(args)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(", ".join(f"{k}={row.get(k, '')}" for k in FIELDS), flush=True)
        write_csv(out, "speed", rows, FIELDS)  # the rows so far, if a time limit stops the run

    for checkpoint in args.checkpoint or [None]:
        label = Path(checkpoint).name if checkpoint else args.unet or "sd15"
        for precision in args.precision:
            for lever in args.levers:
                for batch in args.batch:
                    for per_call in args.members_per_call or [None]:
                        base = dict(mode="inference", model=label, precision=precision, lever=lever, batch=batch,
                                    size=args.size, **({"ensemble": args.ensemble, "members_per_call": per_call}
                                                       if args.ensemble > 1 else {}))  # fmt: skip
                        add(_guarded(lambda: inference_row(*build_model(args.unet, checkpoint, args.steps, "both", args.size,
                                                                        device),
                                                           batch, args.size, precision, lever, device, args.iters,
                                                           args.warmup, args.peak_tflops, args.ensemble, per_call),
                                     base))  # fmt: skip
    for precision in args.precision:
        for lever in args.train_levers if args.train_batch and args.checkpoint is None else []:
            for variant in ("none", "both"):
                for micro in args.train_micro_batch or [None]:
                    base = dict(mode="train", model=args.unet or "sd15", variant=variant, precision=precision, lever=lever,
                                batch=args.train_batch, micro_batch=min(micro or args.train_batch, args.train_batch),
                                size=args.size)  # fmt: skip
                    add(_guarded(lambda: training_row(*build_model(args.unet, None, args.steps, variant, args.size, device),
                                                      args.train_batch, args.size, precision, lever, device, args.iters,
                                                      args.warmup, args.peak_tflops, micro), base))  # fmt: skip
    command = script_command("benchmarks.speed", argv)
    write_csv_and_markdown(out, "speed", rows, FIELDS, f"`{command}` on {hardware_name(device)}\n\n{summary_markdown(rows)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks.speed"))
