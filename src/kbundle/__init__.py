"""kbundle: one small file that carries a notebook, its environment and a CUDA base."""

__version__ = "0.2.0"
