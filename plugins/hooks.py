"""Hook specifications a plugin may implement."""
import pluggy

PROJECT = "pageport"
ENTRY_POINT_GROUP = "pageport"
# Bumped on any incompatible change to the hooks or to Platform/AttentionBackend.
# A plugin declares the version it was written for as module attribute
# PAGEPORT_PLUGIN_API; a different major version is refused with a clear reason.
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PageportSpec:
    @hookspec
    def pageport_platforms(self):
        """Return a list of Platform subclasses this plugin offers."""

    @hookspec
    def pageport_models(self):
        """Return a dict: Hugging Face architecture name -> model class."""
