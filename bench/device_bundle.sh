#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels that bench/device_checks.sh needs on a GPU machine that cannot reach
# it: caer's dependencies that the H200 image lacks (open_clip and its text cleaners, zarr and its codecs), for
# CPython 3.12 on x86-64, into .whl/ (ignored by git). With --nvimgcodec it adds nvImageCodec and its nvJPEG
# library (about 29 MB), which bench/decode_probe.py then times as a candidate decoder.
#
#   bash bench/device_bundle.sh [--nvimgcodec]
#
# Then carry .whl to the GPU machine and run, from the repository root there:
#   bash bench/device_checks.sh extract      (device_checks.sh installs .whl/ first when it is there)
set -eu
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
wheels=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
        google-crc32c==1.9.0)
if [ "${1:-}" = --nvimgcodec ]; then
  wheels+=(nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43)  # CUDA 13: the image's torch is cu130
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
ls -la .whl
du -sh .whl
