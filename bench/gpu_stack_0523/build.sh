#!/usr/bin/env bash
# Builds the offline SGLang 0.5.23 stack for the GPU host with ../shared/gpu-stack's build.sh,
# run from a temporary copy of that folder whose pins.txt is one of ours:
#   (default)  pins.txt       route A: SGLang 0.5.23 and its runtime dependencies for the host's
#                             torch 2.11; parts in .gpu-stack-0523/
#   k046       pins-k046.txt  route A': sglang-kernel 0.4.6 alone (built for torch 2.11), an
#                             add-on site; parts in .gpu-stack-0523-k046/
#   torch      pins-torch.txt route B: torch 2.14.1, triton, torchvision and NCCL, an add-on site;
#                             parts in .gpu-stack-0523-torch/ (about 820 MB of parts; needs
#                             about 4.5 GB of free disk while it builds)
# Each output folder holds one numbered folder per transfer (OUT/1, OUT/2, ...), the last with a
# copy of the shared install.sh. Output folders are ignored by git.
# Usage (repository root, a machine with PyPI): bash bench/gpu_stack_0523/build.sh [a|k046|torch] [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
shared=${GPU_STACK_SHARED:-$root/../shared/gpu-stack}
route=${1:-a}
case $route in
  a) pins=$here/pins.txt; out=${2:-$root/.gpu-stack-0523} ;;
  k046) pins=$here/pins-k046.txt; out=${2:-$root/.gpu-stack-0523-k046} ;;
  torch) pins=$here/pins-torch.txt; out=${2:-$root/.gpu-stack-0523-torch} ;;
  *) echo "usage: build.sh [a|k046|torch] [OUT_DIR]" >&2; exit 2 ;;
esac
[ -f "$shared/build.sh" ] || { echo "no $shared/build.sh (set GPU_STACK_SHARED)" >&2; exit 1; }
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
cp "$shared"/build.sh "$shared"/install.sh "$shared"/slim_wheel.py "$copy"/
cp "$pins" "$copy/pins.txt"
if ! grep -q '^sglang-kernel==' "$pins"; then
  # The shared build slims the sglang-kernel wheel (FA3 and sm100 objects out); a set without one
  # has nothing to slim.
  printf 'pass\n' > "$copy/slim_wheel.py"
fi
# The shared build's pip reads this machine's pip configuration, whose local indexes and caps are
# for its own CPU installs, not for the target: PyPI alone. PIP_PLATFORM adds to the shared
# build's --platform list (pip appends command-line values to the environment's): NCCL's wheels
# are tagged manylinux_2_18 only.
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_PLATFORM=manylinux_2_18_x86_64 \
  bash "$copy/build.sh" "$out"
du -sh "$out"/[0-9]*
