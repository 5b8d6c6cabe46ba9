"""Loads every entry point of the `pageport` group once; failures are recorded, never raised."""
from __future__ import annotations

import functools
import importlib.metadata
import logging
from dataclasses import dataclass

import pluggy

from pageport.plugins.hooks import ENTRY_POINT_GROUP, PLUGIN_API_VERSION, PROJECT, PageportSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadError:
    plugin: str  # entry-point name
    target: str  # module path it points to
    reason: str


_errors: list[LoadError] = []


def _load(pm: pluggy.PluginManager, ep: importlib.metadata.EntryPoint) -> None:
    try:
        module = ep.load()
    except Exception as e:  # a broken plugin must never take the engine down
        _errors.append(LoadError(ep.name, ep.value, f"import failed: {type(e).__name__}: {e}"))
        logger.warning("pageport plugin %r (%s) failed to import: %s", ep.name, ep.value, e)
        return
    version = getattr(module, "PAGEPORT_PLUGIN_API", PLUGIN_API_VERSION)
    if version != PLUGIN_API_VERSION:
        _errors.append(LoadError(ep.name, ep.value,
                                 f"written for plugin API {version}, this pageport has {PLUGIN_API_VERSION}"))
        return
    if pm.is_registered(module):
        return
    try:
        pm.register(module, name=ep.name)
    except ValueError as e:  # two plugins claiming one name
        _errors.append(LoadError(ep.name, ep.value, f"not registered: {e}"))


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PageportSpec)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load(pm, ep)
    return pm


def load_errors() -> list[LoadError]:
    get_plugin_manager()
    return list(_errors)


def reset() -> None:
    """Forget loaded plugins (tests that add entry points at run time)."""
    get_plugin_manager.cache_clear()
    _errors.clear()
