from pageport.plugins import hookimpl

PAGEPORT_PLUGIN_API = 1  # the pageport plugin API this package was written against


@hookimpl
def pageport_platforms():
    from pageport_example_vendor.platform import RefCpuPlatform
    return [RefCpuPlatform]
