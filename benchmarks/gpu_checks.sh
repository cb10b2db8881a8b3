#!/usr/bin/env bash
# The GPU measurements of the speed (#8) and memory (#3) issues, as one prepared command for
# the lent device machine (see ../shared/device/README.md; results: benchmarks/results/h200/).
#
#   bash benchmarks/gpu_checks.sh STAGE [STAGE ...]
#
# Stages (each under its own `timeout`, seconds in brackets): choose stages whose limits add up
# to what one device command may run (10 minutes) and the session's device time allows. On the
# H200 (2026-12-04) memory-b1, speed-sd15 and levers-b8 took 180 s together, memory-b8,
# cuda-tests and speed-small 187 s (benchmarks/results/h200/), before speed-sd15 gained its
# CUDA-graph training rows and levers-b8 its attention-kept row. The exit status is 1 when any
# stage failed or ran out of time (each stage's own is in the log: "=== NAME: exit N").
#   memory-b1    the core issue's table: sd15, batch 1, T = 1, 2, 3, 6, 12, every variant
#                (none, checkpoint, steps, both, and both with attention kept): peak memory,
#                time per iteration                                                     [250]
#   graphs-b1    the core issue's time ratio where the host sets the pace: sd15, batch 1,
#                T = 1, 2, 3, 6, 12, none and both, each iteration replayed as one CUDA
#                graph (benchmarks.memory --cuda-graphs)                                 [200]
#   speed-sd15   the speed issue's targets: sd15 inference batch 16 bf16, eager and CUDA
#                graph; training batch 8 in bf16 (plain and memory-saving backward), eager
#                and as a CUDA graph                                                     [200]
#   levers-b8    sd15, batch 8, T=3: none, both, both with each lever of its backward
#                switched off (the last step recomputed; unwired layers keeping all) and
#                with the wired blocks' attention kept (IDMConfig.keep_attention)        [120]
#   memory-b8    the same table at batch 8 (T = 2 left out)                              [300]
#   speed-small  shipped prior U-Net, 256x256, T=3: inference batch 1 and 16, fp32 and bf16,
#                eager and CUDA graph; training batch 16 (plain and memory-saving)      [150]
#   cuda-tests   the CUDA-only tests: operators on the GPU, CUDA-graph replay == eager
#                (inference, and the whole training iteration)                           [120]
#   compile      sd15 with torch.compile of the noise estimator: inference batch 16 and
#                training batch 8 (plain and memory-saving), bf16                         [300]
#   attention    sd15 with attention restricted to each of torch's kernels (flash, memory-
#                efficient, cuDNN): inference batch 16, training batch 8, bf16           [240]
#   profile      sd15 kernel time by kind (attention, convolution, ...): inference batch 16,
#                training batch 8 plain and memory-saving, bf16                          [150]
#   ensemble     shipped prior U-Net, 256x256, T=3: the test-time ensemble of 8 at batch 1, its
#                copies one per call and 4 (one image shape) per call, fp32 and bf16      [120]
#
# What travels to the device machine is at most 64 MiB a call: the tracked tree is about 59 MiB
# (idm/weights about 50 of it) and the wheels about 10 MiB. These stages read no shipped weights but
# idm/weights/prior-natural-y (PRIOR), so move the other shipped folders out of the checkout for the
# call, and back after it (`git status --short idm/weights` then lists nothing):
#   mkdir -p /tmp/weights-aside && for d in idm/weights/*/; do
#     [ "$d" = idm/weights/prior-natural-y/ ] || mv "$d" /tmp/weights-aside/; done
#   mv /tmp/weights-aside/* idm/weights/                                            # after the call
# On the device machine, with the wheels carried (`carry: [".whl"]`), run from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PYTHONPATH && bash benchmarks/gpu_checks.sh cuda-tests graphs-b1 levers-b8
#
# What comes back is $OUT/log.txt (everything printed) and $OUT/results.tar (each stage's
# speed.csv/.md or memory.csv/.md under its stage name), rewritten after every stage so that a
# run stopped at the time limit still returns what finished. Without $OUT, both go to
# ./gpu-checks. DEVICE (default cuda), SIZE (256), SD15 (sd15) and PRIOR (the shipped
# prior-natural-y) may be set to try the script elsewhere, e.g. on the CPU:
#   DEVICE=cpu SIZE=32 SD15=tiny PRIOR=tiny bash benchmarks/gpu_checks.sh speed-small speed-sd15
set -uo pipefail
export PYTHONUNBUFFERED=1

OUT=${OUT:-gpu-checks}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
SD15=${SD15:-sd15}
PRIOR=${PRIOR:-idm/weights/prior-natural-y}
PEAK=790  # the bf16 dense TFLOP/s the speed issue takes for these GPUs
GRAPHS=$([ "${DEVICE%%:*}" = cuda ] && echo cudagraphs)  # the CUDA-graph levers, left out of a dry run elsewhere
STAGES=()
for stage in "$@"; do  # each stage once, in the order given
    [[ " ${STAGES[*]} " == *" $stage "* ]] || STAGES+=("$stage")
done
KNOWN=" memory-b1 graphs-b1 speed-sd15 levers-b8 memory-b8 speed-small cuda-tests compile attention profile ensemble "
[ ${#STAGES[@]} -eq 0 ] && { echo "name the stages to run (one or more of:$KNOWN)" >&2; exit 2; }
for stage in "${STAGES[@]}"; do
    [[ $KNOWN == *" $stage "* ]] || { echo "unknown stage '$stage' (one of:$KNOWN)" >&2; exit 2; }
done
mkdir -p "$OUT" || { echo "cannot create OUT=$OUT" >&2; exit 2; }
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT

FAILED=0
run_stage() {  # name, seconds, command...
    local name=$1 seconds=$2 status
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), at most ${seconds} s): $*"
    timeout "$seconds" "$@"
    status=$?
    echo "=== $name: exit $status"
    [ "$status" -eq 0 ] || FAILED=1
    tar -cf "$OUT/results.tar" -C "$RESULTS" .
}

{
    python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
    for stage in "${STAGES[@]}"; do
        case $stage in
            cuda-tests)
                run_stage "$stage" 120 python3 -m pytest -q -p no:cacheprovider tests/test_operators.py tests/test_benchmark.py \
                    -k "cuda or captured" ;;
            speed-small)
                run_stage "$stage" 150 python3 -m benchmarks.speed --device "$DEVICE" --unet "$PRIOR" --size "$SIZE" --steps 3 \
                    --batch 1 16 --precision fp32 bf16 --levers base $GRAPHS --train-batch 16 --peak-tflops $PEAK \
                    --iters 5 --warmup 2 --out "$RESULTS/$stage" ;;
            speed-sd15)
                run_stage "$stage" 200 python3 -m benchmarks.speed --device "$DEVICE" --unet "$SD15" --size "$SIZE" --steps 3 \
                    --batch 16 --precision bf16 --levers base $GRAPHS --train-batch 8 --train-levers base $GRAPHS \
                    --peak-tflops $PEAK --iters 3 --warmup 1 --out "$RESULTS/$stage" ;;
            graphs-b1)
                run_stage "$stage" 200 python3 -m benchmarks.memory --device "$DEVICE" --unet "$SD15" --size "$SIZE" \
                    --variants none both --batch 1 --steps 1 2 3 6 12 --iters 3 --warmup 1 --cuda-graphs \
                    --out "$RESULTS/$stage" ;;
            memory-b1)
                run_stage "$stage" 250 python3 -m benchmarks.memory --device "$DEVICE" --unet "$SD15" --size "$SIZE" \
                    --variants none checkpoint steps both --ablations attention-kept --batch 1 --steps 1 2 3 6 12 --iters 2 --warmup 1 \
                    --out "$RESULTS/$stage" ;;
            levers-b8)
                run_stage "$stage" 120 python3 -m benchmarks.memory --device "$DEVICE" --unet "$SD15" --size "$SIZE" \
                    --variants none both --ablations last-step-recomputed unwired-layers-plain attention-kept --batch 8 --steps 3 \
                    --iters 2 --warmup 1 --out "$RESULTS/$stage" ;;
            compile)
                run_stage "$stage" 300 python3 -m benchmarks.speed --device "$DEVICE" --unet "$SD15" --size "$SIZE" --steps 3 \
                    --batch 16 --precision bf16 --levers compile --train-batch 8 --train-levers compile --peak-tflops $PEAK \
                    --iters 3 --warmup 2 --out "$RESULTS/$stage" ;;
            attention)
                run_stage "$stage" 240 python3 -m benchmarks.speed --device "$DEVICE" --unet "$SD15" --size "$SIZE" --steps 3 \
                    --batch 16 --precision bf16 --levers sdpa-flash sdpa-efficient sdpa-cudnn --train-batch 8 \
                    --train-levers sdpa-flash sdpa-efficient sdpa-cudnn --peak-tflops $PEAK --iters 3 --warmup 1 \
                    --out "$RESULTS/$stage" ;;
            profile)
                run_stage "$stage" 150 python3 -m benchmarks.kernel_profile --device "$DEVICE" --unet "$SD15" --size "$SIZE" \
                    --steps 3 --batch 16 --train-batch 8 --train-variants none both --mode inference train --precision bf16 \
                    --out "$RESULTS/$stage" ;;
            ensemble)
                run_stage "$stage" 120 python3 -m benchmarks.speed --device "$DEVICE" --unet "$PRIOR" --size "$SIZE" --steps 3 \
                    --batch 1 --precision fp32 bf16 --ensemble 8 --members-per-call 1 4 --iters 5 --warmup 2 \
                    --out "$RESULTS/$stage" ;;
            memory-b8)
                run_stage "$stage" 300 python3 -m benchmarks.memory --device "$DEVICE" --unet "$SD15" --size "$SIZE" \
                    --variants none checkpoint steps both --ablations attention-kept --batch 8 --steps 1 3 6 12 --iters 1 --warmup 1 \
                    --out "$RESULTS/$stage" ;;
        esac
    done
    exit $FAILED  # through the pipe (pipefail): the device tool's rc says whether every stage passed
} 2>&1 | tee "$OUT/log.txt"
