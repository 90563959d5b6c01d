#!/bin/sh
# kbundle's ENTRYPOINT: activate the image's conda environment the way `conda activate`
# would, then run the container's command. /opt/kbundle/env is kbundle's image contract
# (src/kbundle/contract.py); the Dockerfile copies this file to /usr/local/bin/kbundle-activate.
export CONDA_PREFIX=/opt/kbundle/env
export CONDA_DEFAULT_ENV=/opt/kbundle/env
export PATH="$CONDA_PREFIX/bin:$PATH"

# CUDA libraries inside the environment: the nvidia/*/lib folders of pip's nvidia-* wheels,
# and, when the Dockerfile sets KBUNDLE_ENV_LIBS=1, the conda CUDA runtime in the env's lib/.
cuda_libs=""
for d in "$CONDA_PREFIX"/lib/python3*/site-packages/nvidia/*/lib; do
  [ -d "$d" ] && cuda_libs="$cuda_libs${cuda_libs:+:}$d"
done
if [ "${KBUNDLE_ENV_LIBS:-0}" = 1 ]; then
  cuda_libs="$CONDA_PREFIX/lib${cuda_libs:+:}$cuda_libs"
fi
if [ -n "$cuda_libs" ]; then
  export LD_LIBRARY_PATH="$cuda_libs${LD_LIBRARY_PATH:+:}$LD_LIBRARY_PATH"
fi

# What the environment's packages ask for on activation (e.g. GDAL_DATA, JAVA_HOME).
for f in "$CONDA_PREFIX"/etc/conda/activate.d/*.sh; do
  [ -r "$f" ] && . "$f"
done

exec "$@"
