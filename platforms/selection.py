"""Finds every registered platform and picks one for --device / PAGEPORT_DEVICE."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from pageport.platforms.interface import Platform
from pageport.plugins import get_plugin_manager, load_errors


@dataclass(frozen=True)
class PlatformInfo:
    name: str
    plugin: str
    priority: int
    available: bool
    reason: str  # why not available, or "" when it is
    cls: Optional[type[Platform]]  # None when its plugin failed to load


class UnknownDeviceError(ValueError):
    pass


def _reason(cls: type[Platform]) -> Optional[str]:
    try:
        return cls.unavailable_reason()
    except Exception as e:  # a plugin's probe must not break selection
        return f"availability check raised {type(e).__name__}: {e}"


def list_platforms() -> list[PlatformInfo]:
    """Every platform any plugin registers, available or not, plus plugins that failed to load."""
    pm = get_plugin_manager()
    infos: list[PlatformInfo] = []
    for impl in pm.hook.pageport_platforms.get_hookimpls():
        try:
            classes = impl.function() or []
        except Exception as e:
            infos.append(PlatformInfo(impl.plugin_name, impl.plugin_name, 0, False,
                                      f"pageport_platforms() raised {type(e).__name__}: {e}", None))
            continue
        for cls in classes:
            reason = _reason(cls)
            infos.append(PlatformInfo(cls.name, impl.plugin_name, cls.priority, reason is None,
                                      reason or "", cls))
    for err in load_errors():
        infos.append(PlatformInfo(err.plugin, err.target, 0, False, err.reason, None))
    return sorted(infos, key=lambda i: (-i.available, -i.priority, i.name))


def platforms_table(infos: Optional[list[PlatformInfo]] = None) -> str:
    infos = list_platforms() if infos is None else infos
    rows = [("PLATFORM", "AVAILABLE", "PRIORITY", "PLUGIN", "DETAILS")]
    for i in infos:
        details = i.reason
        if i.available and i.cls is not None:
            try:
                details = ", ".join(f"{k}={v}" for k, v in i.cls().describe().items())
            except Exception as e:
                details = f"describe() raised {e}"
        rows.append((i.name, "yes" if i.available else "no", str(i.priority), i.plugin, details))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows)


def resolve_platform(device: Optional[str] = None) -> Platform:
    """`auto` (or None) takes the available platform of highest priority; a name takes that one."""
    device = device or os.environ.get("PAGEPORT_DEVICE") or "auto"
    infos = list_platforms()
    if device == "auto":
        for info in infos:
            if info.available:
                return info.cls()
        raise UnknownDeviceError("no platform is available:\n" + platforms_table(infos))
    for info in infos:
        if info.name == device:
            if not info.available:
                raise UnknownDeviceError(f"device {device!r} is not available: {info.reason}\n"
                                         + platforms_table(infos))
            return info.cls()
    raise UnknownDeviceError(f"unknown device {device!r}; registered platforms:\n" + platforms_table(infos))

