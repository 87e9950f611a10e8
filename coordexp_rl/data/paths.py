"""Image paths of the data contract: relative to an image root, and inside it after symlinks resolve.

Every reader of a contract file (``validate``, training, inference, evaluation) gets its image paths
from ``resolve_image_path``: the one place where a path is checked. The lexical checks (absolute,
``..``) alone let a symlink under the root that points elsewhere through, so the path is resolved first
and the resolved path must lie under the resolved root.

>>> path_escape_reason("a/b.png") is None, path_escape_reason("../b.png") is not None
(True, True)
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from coordexp_rl.errors import UserError


class ImagePathError(UserError):
    """An image path that is absolute, climbs out with ``..``, or resolves outside its image root."""

    kind = "data error"


def path_escape_reason(rel: str) -> str | None:
    """Why an image path is not a plain relative path inside the image root (None when it is)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        return f"{rel!r} is absolute; image paths must be relative to the image root"
    if ".." in p.parts:
        return f"{rel!r} contains '..'; image paths must stay inside the image root"
    return None


def resolve_image_path(root: Path, rel: str, resolved_root: Path | None = None) -> Path:
    """``root / rel`` with every symlink resolved; raises ImagePathError when it leaves ``root``.

    resolved_root: ``root.resolve()``, when the caller resolves many paths under one root.
    A missing file is not an error here (the image checks report it); only where the path points.
    """
    reason = path_escape_reason(rel)
    if reason:
        raise ImagePathError(reason)
    base = resolved_root if resolved_root is not None else root.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise ImagePathError(f"{rel!r} resolves to {str(path)!r}, outside the image root {str(base)!r} "
                             "(a symlink that points out of the root?); copy the file under the root "
                             "or point the image root at the folder that holds it")
    return path
