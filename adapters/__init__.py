"""The domain floor, above ``kernels``: the method registry (one kind object per adapter-layer kind)
and the adapter file format. Torch-free, like everything below ``toolchain.graphs``."""
