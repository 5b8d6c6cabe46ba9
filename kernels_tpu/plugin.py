"""Entry point of the built-in TPU/XLA backend. Importing it loads neither torch_xla nor jax."""
from pageport.plugins import hookimpl

PAGEPORT_PLUGIN_API = 1


@hookimpl
def pageport_platforms():
    from pageport.kernels_tpu.platform import TpuPlatform, XlaPlatform
    return [TpuPlatform, XlaPlatform]
