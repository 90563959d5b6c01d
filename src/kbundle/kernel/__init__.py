"""The kernel stage: a Jupyter kernel that runs inside the bundle's image.

- `spec`: install, list and remove kbundle's kernelspecs (user level, like `jupyter kernelspec`).
- `launcher`: the `kbundle-kernel` process a kernelspec's argv starts; it drives one container.
  Its pure plan is `launch_plan`, its signals and parent watch `launch_lifecycle` (shared with
  Slurm), and what it may mount `launch_mounts`.
- `slurm`, `node_agent`, `slurm_doctor`: kernels on a Slurm compute node.
- `forward`, `shim`, `labels`, `banner`, `noise`, `compare`: ports, the in-container shim, labels,
  the banner, folded framework noise, output comparison.
- `gc`: find and remove what dead kernels and unused bundles left behind.
- `execute`: run a notebook headless in a kernel and compare its outputs with the saved ones.
- `lab`: open JupyterLab on a bundle's working directory.

Modules import docker, jupyter_client and nbclient inside functions so that importing
this package stays cheap.
"""
