#!/usr/bin/env bash
# Prepares .whl/ (ignored by git) with what the GPU machine lacks for bench/gpu.sh, on a machine with PyPI access:
# the GPU machine has no network, Python 3.12 on x86-64 Linux, torch, transformers, pyarrow, pandas, scikit-learn,
# tensorboard and most else psamf needs, but not Ray. Everything carried with the working tree must stay under
# 64 MiB, and Ray's wheel alone is 79 MB, so Ray travels unpacked and recompressed (xz) without the parts psamf never
# loads: the Java jars (33 MB), RLlib and the dashboard's JavaScript source maps (about 30 MB in all).
#
#   bash bench/gpu_wheels.sh            # here, once: writes .whl/ray-<version>-slim.tar.xz and .whl/deps/*.whl
#   then on the GPU machine, in one device call with carry [".whl"]:
#   source bench/gpu_setup.sh && bash bench/gpu.sh "$OUT"
#
# PYVER (default 3.12) is the GPU machine's Python; RAY (default the version psamf pins) the Ray release.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
RAY=${RAY:-2.60.0}
TAG=cp${PYVER/./}
DEST=${DEST:-.whl}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
plat=(--only-binary=:all: --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

"$PY" -m pip download -q --no-deps --dest "$TMP/ray" "${plat[@]}" "ray==$RAY"
whl=$(ls "$TMP"/ray/ray-"$RAY"-"$TAG"-*.whl)
mkdir -p "$TMP/unpacked"
# unpacked with the files' modes (`python -m zipfile -e` drops them, and Ray's gcs_server and raylet must be executable)
"$PY" - "$whl" "$TMP/unpacked" <<'PYEOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(path, mode)
PYEOF
# Ray's dependencies for its data, train and tune extras that the GPU machine's image lacks (with their own
# dependencies resolved, then whatever the image already has dropped below); tensorboardX alone, without numpy etc.
"$PY" -m pip download -q --dest "$TMP/deps" "${plat[@]}" "pydantic>=2.13,<3" jsonschema
"$PY" -m pip download -q --no-deps --dest "$TMP/deps" "${plat[@]}" "tensorboardX>=1.9"
rm -f "$TMP"/deps/{typing_extensions,attrs}-*.whl

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp/deps"
(cd "$TMP/unpacked" && tar cf - --exclude=ray/jars --exclude='*.js.map' --exclude=ray/rllib ray "ray-$RAY.dist-info") \
  | xz -T0 -6 > "$DEST.tmp/ray-$RAY-slim.tar.xz"
cp "$TMP"/deps/*.whl "$DEST.tmp/deps/"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
size=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "$DEST: $((size / 1048576)) MiB; tracked files $((tree / 1048576)) MiB; the device carries 64 MiB in all"
ls -la "$DEST" "$DEST/deps"
if [ $((size + tree)) -gt $((60 * 1048576)) ]; then
  echo "too large to carry: leave more out of Ray" >&2
  exit 1
fi
