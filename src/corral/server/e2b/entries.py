"""Corral's file entries and watch events in E2B envd's shapes (`filesystem.EntryInfo`,
`filesystem.FilesystemEvent`), shared by the Filesystem service and `/files`."""

from __future__ import annotations

import stat

from corral.envd import filesystem_pb2 as fs
from corral.guest import EntryInfo, WatchEvent
from corral.server import convert

_FILE_TYPES = {
    "file": fs.FILE_TYPE_FILE,
    "dir": fs.FILE_TYPE_DIRECTORY,
    "symlink": fs.FILE_TYPE_SYMLINK,
}
_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
_EVENT_TYPES = {
    "create": fs.EVENT_TYPE_CREATE,
    "write": fs.EVENT_TYPE_WRITE,
    "remove": fs.EVENT_TYPE_REMOVE,
    "rename": fs.EVENT_TYPE_RENAME,
    "chmod": fs.EVENT_TYPE_CHMOD,
}


def entry_info(info: EntryInfo) -> fs.EntryInfo:
    """E2B's EntryInfo: a symlink has its target's type and the absolute path it resolves
    to (a dangling one stays a symlink); `mode` holds the permission bits only."""
    kind: str = info.type
    if info.type == "symlink" and info.resolved_type is not None:
        kind = info.resolved_type
    entry = fs.EntryInfo(
        name=info.name,
        type=_FILE_TYPES.get(kind, fs.FILE_TYPE_UNSPECIFIED),
        path=info.path,
        size=info.size,
        mode=info.mode & 0o777,
        permissions=stat.filemode(_TYPE_BITS.get(info.type, 0) | info.mode),
        owner=info.owner,
        group=info.group,
        modified_time=convert.timestamp(info.mtime),
        metadata=info.metadata or {},
    )
    if info.type == "symlink":
        entry.symlink_target = info.resolved or info.symlink_target or ""
    return entry


def event(found: WatchEvent) -> fs.FilesystemEvent:
    event = fs.FilesystemEvent(
        name=found.name, type=_EVENT_TYPES.get(found.type, fs.EVENT_TYPE_UNSPECIFIED)
    )
    if found.entry is not None:
        event.entry.CopyFrom(entry_info(found.entry))
    return event


def written(info: EntryInfo) -> dict[str, object]:
    """One item of `POST /files`'s answer."""
    item: dict[str, object] = {"path": info.path, "name": info.name, "type": "file"}
    if info.metadata:
        item["metadata"] = info.metadata
    return item
