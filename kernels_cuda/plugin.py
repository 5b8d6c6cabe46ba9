"""Entry point of the built-in CUDA backend. Importing it loads neither CUDA nor triton."""
from pageport.plugins import hookimpl

PAGEPORT_PLUGIN_API = 1


@hookimpl
def pageport_platforms():
    from pageport.kernels_cuda.platform import CudaPlatform
    return [CudaPlatform]
