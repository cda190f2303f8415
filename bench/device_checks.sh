#!/usr/bin/env bash
# The GPU checks of issue 12 in one go (about 9 minutes on one H200), for a session that is lent a GPU.
# Run from the repository root with caer importable (installed, or PYTHONPATH set), or with the .whl/ folder that
# bench/device_bundle.sh fills carried along (then this installs it and runs caer from the tree); results land in
# $OUT (default .).
# Its first argument picks a part: "extract" (1-3, about 6 minutes, at most 9 by its timeouts), "train" (4-5, about
# 3), or "all" (the default): each part fits in one 10-minute device command.
#   1. the tensor path's fidelity on the GPU (nvJPEG + half-precision products against PIL);
#   2. where the GPU decode's time goes (bench/decode_probe.py);
#   3. extraction images/s against the bare encoder on 720p frames, pil vs tensor, with --diagnose, with 16, 128 and
#      512 frames per nvJPEG call, and with the writer thread instead of the writer processes;
#   4. stage 2 from the cache vs raw frames, and stage 3 with --decode pil (CPU workers) vs tensor (the GPU);
#   5. a 2-process NCCL run, when the machine has 2 GPUs.
set -u
export PYTHONUNBUFFERED=1
OUT=$(mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd) || exit 1  # absolute: the steps run from bench/
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

PART=${1:-all}
case "$PART" in extract|train|all) ;; *) echo "usage: $0 [extract|train|all]" >&2; exit 2 ;; esac
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

if [ -d .whl ]; then  # a GPU machine without caer's other dependencies: the carried wheels, caer from this tree
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD:/tmp/site
  [ -d caer/configs ] || cp -r configs caer/configs  # where the installed package keeps them (pyproject's package-dir)
fi

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "cores: $(nproc)"; lscpu | grep "Model name"
python3 -c "import torch, torchvision, open_clip, zarr; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__, 'zarr', zarr.__version__)"
python3 - <<'PY'  # what the steps import: a missing one is named here, not lost in a step's tail
import importlib.util
missing = [m for m in ("xdist", "av", "typer", "rich", "sklearn", "h5py", "PIL") if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) if missing else "none")
PY

if part extract; then
step "fidelity: tests/test_tensor_views.py on CUDA"
timeout 100 python3 -m pytest -p no:cacheprovider -n 0 -q -rfE --tb=short tests/test_tensor_views.py \
  -k "gpu or loader or decode_ahead" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30

(cd bench
step "decode probe"
timeout 80 python3 decode_probe.py 2>&1

step "extract, 720p: --decode pil"
timeout 80 python3 extract.py --device cuda --workers 4 --width 1280 --height 720 --clips 20 --frames 16 --repeat 4 \
  --encoder-seconds 5 --decode pil --json "$OUT/extract_pil.json" 2>&1 | grep -v "^machine"
step "extract, 720p: --decode tensor, with --diagnose"
timeout 130 python3 extract.py --device cuda --workers 4 --width 1280 --height 720 --clips 20 --frames 16 --repeat 80 \
  --encoder-seconds 5 --decode tensor --diagnose --json "$OUT/extract_tensor.json" 2>&1 | grep -v "^machine"

step "extract, 720p: --decode tensor, frames per nvJPEG call (a clip, the default, 32 clips)"
timeout 100 python3 extract.py --device cuda --workers 4 --width 1280 --height 720 --clips 20 --frames 16 --repeat 40 \
  --encoder-seconds 3 --decode tensor --frames-per-decode 16 128 512 --json "$OUT/extract_call_sizes.json" 2>&1 | grep -v "^machine"

step "extract, 720p: --decode tensor, the writer thread instead of writer processes"
timeout 50 python3 extract.py --device cuda --workers 4 --width 1280 --height 720 --clips 20 --frames 16 --repeat 40 \
  --encoder-seconds 3 --decode tensor --writer-processes 0 --json "$OUT/extract_tensor_thread.json" 2>&1 | grep -v "^machine"
)
fi

if part train; then

step "train: stage 2 cache vs raw, stage 3 --decode pil vs tensor (720p)"
(cd bench && timeout 170 python3 train.py --device cuda --clips 60 --workers 4 --width 1280 --height 720 --stages 2 3 \
  --decode tensor pil --epochs 2 --cache-epochs 3 --json "$OUT/train.json" 2>&1 | grep -v "^machine")

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  step "NCCL: caer extract under torchrun, 2 processes"
  timeout 60 python3 - <<'PY'
import subprocess, sys, tempfile
from pathlib import Path
from caer.config import SynthConfig
from caer.data.synth import synthesise
tmp = Path(tempfile.mkdtemp())
synthesise(SynthConfig(str(tmp / "ds"), clips=20, frames=8))
cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "caer.cli", "extract", str(tmp / "ds" / "train.txt"),
       "--face-boxes", str(tmp / "ds" / "face_boxes.json"), "--out", str(tmp / "c.zarr"), "--pretrained", "random",
       "--device", "cuda"]
done = subprocess.run(cmd, capture_output=True, text=True)
print("exit", done.returncode, done.stdout[-1500:], done.stderr[-1500:])
PY
else
  step "NCCL: skipped, one GPU (NCCL runs one rank per GPU)"
fi
fi
step done
