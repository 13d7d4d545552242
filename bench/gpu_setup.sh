# Source this on the GPU machine (bash), from the repository root, with .whl/ carried (bench/gpu_wheels.sh made it):
#   source bench/gpu_setup.sh && bash bench/gpu.sh "$OUT"
# Installs the carried dependency wheels into the machine's python3 (no network: --no-index), unpacks Ray into a
# private directory, and puts that directory and the repository on PYTHONPATH, so that `python3 -m psamf.cli ...`
# and Ray's worker processes find both. Prints the versions it ends up with.
_psamf_root=$(pwd)
_psamf_site=${PSAMF_SITE:-/tmp/psamf-site}
_psamf_whl=${PSAMF_WHL:-$_psamf_root/.whl}
"${PY:-python3}" -m pip install -q --no-index --find-links "$_psamf_whl/deps" "$_psamf_whl"/deps/*.whl || return 1
if [ ! -d "$_psamf_site/ray" ]; then
  mkdir -p "$_psamf_site" && tar xJf "$_psamf_whl"/ray-*-slim.tar.xz -C "$_psamf_site" || return 1
fi
export PYTHONPATH="$_psamf_site:$_psamf_root${PYTHONPATH:+:$PYTHONPATH}"
"${PY:-python3}" -c "import psamf, ray, torch, transformers; print('ray', ray.__version__, 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || return 1
