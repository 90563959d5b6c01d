"""The CLI's command modules, one per part of the flow; `kbundle.cli` registers each explicitly.

- pack.py     `pack`              (the sender)
- bundle.py   `inspect`, `verify` (reading a bundle)
- run.py      `run`, `doctor`     (the recipient)
- kernels.py  `kernels list|remove`, `gc`
- push.py     `push`              (an image for a registry, e.g. for Slurm nodes)
- trust.py    `trust add|list`    (the senders a recipient trusts)

Commands stay thin: parse, call one flow or module, print. Heavy imports (docker, rattler,
jupyter_client) stay inside the functions, so `kbundle pack` starts about as fast as typer.
"""
