"""Entry point of the built-in CPU backend (registered like any vendor plugin)."""
from pageport.plugins import hookimpl

PAGEPORT_PLUGIN_API = 1


@hookimpl
def pageport_platforms():
    from pageport.kernels_cpu.platform import CpuPlatform
    return [CpuPlatform]
