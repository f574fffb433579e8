#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the Python 3.12 x86-64 wheels a bare GPU image lacks for
# launch/device_suite.sh: Grain and ArrayRecord (the input pipeline), ml_collections (configs), portpicker
# (Grain), tensorboardX (logs), and the flax/optax/orbax versions the test suite runs with. About 7 MB.
# Run it where PyPI is reachable, then carry .whl/ to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0 tensorboardX==2.6.5 \
    flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
ls -l .whl
