"""Entry point of the built-in Intel GPU (XPU) backend. Importing it loads neither torch.xpu nor triton."""
from pageport.plugins import hookimpl

PAGEPORT_PLUGIN_API = 1


@hookimpl
def pageport_platforms():
    from pageport.kernels_xpu.platform import XpuPlatform
    return [XpuPlatform]
