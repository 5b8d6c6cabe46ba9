"""Plugin discovery: pluggy hooks loaded from the `pageport` entry-point group.

Built-in backends register exactly like vendor packages: a module listed under
`[project.entry-points.pageport]` with `@hookimpl` functions.
"""
from pageport.plugins.hooks import PLUGIN_API_VERSION, hookimpl, hookspec
from pageport.plugins.manager import LoadError, get_plugin_manager, load_errors

__all__ = ["PLUGIN_API_VERSION", "hookimpl", "hookspec", "get_plugin_manager", "load_errors", "LoadError"]
