#!/usr/bin/env bash
# The whole reference on one GPU in one command: MNIST for 20 epochs and CIFAR-10 for 100 epochs with the
# sheets' settings (train_mnist.py, train_cifar10.py: every grid, GIF, checkpoint and loss curve), then the
# metric tables of both final checkpoints with the sheet's DDPM-400 sampler and with DDIM-50 at w = 0, 1, 3
# (50 images per class), tools/bench.py on the GPU first, and an F = 64 CIFAR-10 run when time is left.
#
#   bash tools/gpu_reference.sh OUT DATA
#
# OUT: where everything goes (OUT/log_mnist, OUT/log_cifar10, OUT/log_cifar10_f64, OUT/bench.txt,
# OUT/bench_compile.txt, OUT/times.txt). DATA: a folder with MNIST/raw (torchvision's layout) and
# cifar10-jpeg/{train,test}, e.g. /path/to/data.
# The training steps and the sampling run through torch.compile with CUDA graphs (--compile; COMPILE="" turns it
# off); the data sit on the GPU. The benchmark runs in two parts, each stopped after BENCH_SECONDS (default 1800)
# so that the reference goes on whatever happens: every ingredient of the fast path, eager, at three batch sizes,
# then plain, fast and the two compiled paths at batch 128. Settings can be shrunk for a trial run, e.g. on the CPU
#   DEVICE=cpu TRAIN_FLAGS="--epochs 1 --subset 128 --timesteps 20" EVAL_FLAGS="--n-per-class 2" DDIM_STEPS=10 \
#       BENCH_FLAGS="--configs mnist --batch-sizes 8 --train-steps 1 --timed-steps 2 --rounds 1 --eval-images 20" \
#       F64_SECONDS=0 bash tools/gpu_reference.sh /tmp/out /path/to/data
# and on a GPU the same with DEVICE=cuda COMPILE="" (tests/test_gpu.py runs it so).
set -euo pipefail
out="${1:?usage: bash tools/gpu_reference.sh OUT DATA}"
data="${2:?usage: bash tools/gpu_reference.sh OUT DATA}"
device="${DEVICE:-cuda}"
train_flags="${TRAIN_FLAGS:-}"
eval_flags="${EVAL_FLAGS:-}"
ddim_steps="${DDIM_STEPS:-50}"
f64_seconds="${F64_SECONDS:-300}"      # start the F = 64 run only if at most this many seconds have passed
bench_seconds="${BENCH_SECONDS:-1800}"
python="${PYTHON:-python}"
compile="${COMPILE---compile}"
[ "$device" = "cpu" ] && compile=""   # on a CPU, compiling costs more than the tiny trial saves
mkdir -p "$out"
out="$(cd "$out" && pwd)"; data="$(cd "$data" && pwd)"
cd "$(dirname "$0")/.."      # the repository root: the scripts and tools run from there
start=$SECONDS
step() {  # step NAME COMMAND...: run, log, and record its wall time
    local name="$1" begun=$SECONDS
    shift
    echo "== $name: $*" | tee -a "$out/times.txt"
    "$@"
    echo "== $name took $((SECONDS - begun)) s (at $((SECONDS - start)) s)" | tee -a "$out/times.txt"
}
evaluate() {  # evaluate CHECKPOINT [DATA FLAG...]: DDPM-T and DDIM tables at w = 0, 1, 3
    local checkpoint="$1"
    shift
    step "evaluate ddpm $checkpoint" "$python" -m tools.evaluate metrics --checkpoint "$checkpoint" "$@" --guidance 0 1 3 \
        --device "$device" $compile $eval_flags
    step "evaluate ddim$ddim_steps $checkpoint" "$python" -m tools.evaluate metrics --checkpoint "$checkpoint" "$@" \
        --guidance 0 1 3 --sampler ddim --steps "$ddim_steps" --device "$device" $compile $eval_flags
}

"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$out/times.txt"
step bench timeout "$bench_seconds" "$python" -m tools.bench --devices "$device" --configs cifar10 mnist \
    --batch-sizes 128 256 512 --rounds 2 --train-steps 20 --timed-steps 40 ${BENCH_FLAGS:-} > "$out/bench.txt" 2>&1 \
    || echo "bench did not finish (see $out/bench.txt)" | tee -a "$out/times.txt"
if [ -n "$compile" ]; then
    step bench-compile timeout "$bench_seconds" "$python" -m tools.bench --quick --compile --devices "$device" \
        --configs cifar10 mnist --batch-sizes 128 --rounds 2 --train-steps 20 --timed-steps 40 ${BENCH_FLAGS:-} \
        > "$out/bench_compile.txt" 2>&1 || echo "bench-compile did not finish (see $out/bench_compile.txt)" \
        | tee -a "$out/times.txt"
fi
step mnist "$python" train_mnist.py --data-root "$data" --out "$out/log_mnist" --device "$device" $compile $train_flags
step cifar10 "$python" train_cifar10.py --image-folder "$data/cifar10-jpeg/train" --cache-dir "$out/cache" \
    --out "$out/log_cifar10" --device "$device" $compile $train_flags
evaluate "$(ls "$out"/log_mnist/model_ep*.pth | sort -V | tail -1)" --data-root "$data"
evaluate "$(ls "$out"/log_cifar10/model_ep*.pth | sort -V | tail -1)" --image-folder "$data/cifar10-jpeg/train" \
    --cache-dir "$out/cache"
if [ $((SECONDS - start)) -le "$f64_seconds" ]; then
    step cifar10-f64 "$python" train_cifar10.py --image-folder "$data/cifar10-jpeg/train" --cache-dir "$out/cache" \
        --out "$out/log_cifar10_f64" --n-features 64 --device "$device" $compile $train_flags
fi
echo "== all done in $((SECONDS - start)) s" | tee -a "$out/times.txt"
