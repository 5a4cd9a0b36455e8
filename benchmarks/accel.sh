#!/usr/bin/env bash
# The accelerator run, one command: compiled kernel tests, the quantized-matmul,
# scan, attention and train-step benchmarks, one JSON (accel.json) and one table.
# At most 8 minutes on one H100/H200 (benchmarks/accel.py holds the steps and
# their time limits; benchmarks/README.md, "Accelerator run", the device command).
#
#   bash benchmarks/accel.sh                 # on the GPU machine; output in $OUT (else runs/accel)
#   bash benchmarks/accel.sh --dry-run       # on a CPU: the same steps, tiny, interpreted (~1-2 min)
#   bash benchmarks/accel.sh --wheels        # HERE, before the device call: fetch into .whl/ the
#                                            # wheels that the device image lacks (train_step's)
#
# Other arguments go to benchmarks/accel.py (--steps, --budget, --out, --tests, --workers).
# The device has no package registry: when a .whl/ folder travels with the call (carry),
# its wheels are installed into /tmp/gemkit-site first (never on --dry-run).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"

# What the device image (Python 3.12, jax 0.11.2; /work/.library/device/KINDS.md) lacks,
# for benchmarks/train_step.py: gemkit's config and data (ml_collections, grain and grain's
# own array_record and portpicker) and the Griffin reference (recurrentgemma, typeguard<3).
# The kernel tests and the kernel benchmarks need none of these.
WHEELS="ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 recurrentgemma==1.0.1 typeguard==2.13.3"

if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
  done
  for w in $WHEELS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp $platforms -d .whl "$w" || { echo "accel.sh: could not fetch $w" >&2; exit 1; }
  done
  ls -la .whl
  du -sh .whl
  exit 0
fi

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/gemkit-site .whl/*.whl; then
    export PYTHONPATH="/tmp/gemkit-site${PYTHONPATH:+:$PYTHONPATH}"
    echo "accel.sh: installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/gemkit-site"
  else
    echo "accel.sh: installing the carried wheels failed; the steps that need them will say so" >&2
  fi
fi
exec "$PY" benchmarks/accel.py "$@"
