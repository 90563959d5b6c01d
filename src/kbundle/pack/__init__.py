"""The pack stage: find the sender's environment, normalise it for linux-64, choose
CUDA and a base image, lock it with rattler, render the Dockerfile, write the bundle.

Modules, in flow order (typed records from `records.py` pass between them):
discover (-e file / kernelspec prefix / $CONDA_PREFIX) → envfile, prefix (parse) →
normalise → cuda (evidence, then choice) → lock (+ rattler_solve) → dockerfile →
pipeline (assembles the bundle). Heavy imports (rattler, jupyter_client, jinja2)
happen inside the functions that need them.
"""
