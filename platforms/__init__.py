"""The Platform/AttentionBackend interfaces and --device selection."""
from pageport.platforms.interface import AttentionBackend, AttentionMetadata, GraphRunner, Platform
from pageport.platforms.ops import Ops
from pageport.platforms.selection import (PlatformInfo, UnknownDeviceError, list_platforms,
                                          platforms_table, resolve_platform)

__all__ = ["AttentionBackend", "AttentionMetadata", "GraphRunner", "Platform", "Ops", "PlatformInfo", "UnknownDeviceError",
           "list_platforms", "platforms_table", "resolve_platform"]
