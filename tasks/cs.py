"""Natural-image compressed sensing (the paper's main task, Sec. 4.1).

Block Gaussian CS with orthonormal 32x32-block sampling matrices, structurally
random (a fresh pixel permutation every training iteration), on the Y channel
of 256x256 crops; Adam 1e-4 halved at 20/40/60/80 % of 50k iterations.
"""

from tasks.base import Schedule, Task

TASK = Task(
    name="cs",
    operator="cs",
    operator_defaults={"ratio": 0.1, "block": 32, "mode": "permuted"},
    options=("ratio", "block", "mode"),
    channels=1,
    color="y",
    crop=256,
    schedule=Schedule(iters=50_000, lr=1e-4, milestones=(0.2, 0.4, 0.6, 0.8), batch_size=8),
    final_projection=True,  # the output fits y exactly: PSNR and SSIM up on Set11 at every ratio (README)
    description="block compressed sensing of natural images (Y channel), ratio 10%, permuted 32x32 blocks",
)
