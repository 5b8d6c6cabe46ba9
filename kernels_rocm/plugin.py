"""Entry point of the built-in ROCm backend. Importing it loads neither HIP nor triton."""
from pageport.plugins import hookimpl

PAGEPORT_PLUGIN_API = 1


@hookimpl
def pageport_platforms():
    from pageport.kernels_rocm.platform import RocmPlatform
    return [RocmPlatform]
