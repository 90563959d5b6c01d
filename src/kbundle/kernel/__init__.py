"""The kernel stage: a Jupyter kernel that runs inside the bundle's image.

- `spec`: install, list and remove kbundle's kernelspecs (user level, like `jupyter kernelspec`).
- `launcher`: the `kbundle-kernel` process a kernelspec's argv starts; it drives one container.
- `gc`: find and remove what dead kernels and unused bundles left behind.
- `execute`: run a notebook headless in a kernel and compare its outputs with the saved ones.
- `lab`: open JupyterLab on a bundle's working directory.

Modules import docker, jupyter_client and nbclient inside functions so that importing
this package stays cheap.
"""
