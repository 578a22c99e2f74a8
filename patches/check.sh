#!/usr/bin/env bash
# Check every patch here against its Megatron-LM tag: `patches/check.sh /path/to/Megatron-LM`
# (a clone or a bare git dir holding the tags). Each tag is exported into a fresh temporary
# directory, so the checkout itself is never modified.
set -euo pipefail
repo=${1:?usage: patches/check.sh /path/to/Megatron-LM}
here=$(cd "$(dirname "$0")" && pwd)
status=0
for patch in "$here"/megatron_lm_core_v*.patch; do
    tag=$(basename "$patch" .patch); tag=${tag#megatron_lm_}
    tree=$(mktemp -d)
    git -C "$repo" archive "$tag" | tar -x -C "$tree"
    if (cd "$tree" && git init -q && git apply --check "$patch"); then
        echo "ok    $tag  $(basename "$patch")  ($(git -C "$repo" rev-parse "$tag^{commit}"))"
    else
        echo "FAIL  $tag  $(basename "$patch")"; status=1
    fi
    rm -rf "$tree"
done
exit $status
