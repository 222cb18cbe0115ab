"""Where adapters may come from: names checked, paths confined to ``--adapter-root``.

Pure functions over the file system; they raise :class:`~.errors.ServeError` with the HTTP status a
client should see, so the routes can pass them on unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import ServeError

#: Adapter names become PeftModel adapter names and metric labels: short, no dots or separators.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}")

#: The files of an adapter folder the server reads (the config, then safetensors or a .bin).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def check_name(name: object, reserved: tuple[str, ...] = ()) -> str:
    """An adapter name a client may use: letters, digits, ``_`` and ``-``, at most 64 characters.

    Args:
        name: The name from the request or the command line.
        reserved: Names taken by something else (the base model's served name).

    Raises:
        ServeError: 400 for a malformed name, 409 for a reserved one.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ServeError(400, f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' "
                              "(not starting with '-')", param="lora_name")
    if name in reserved or name == "__base__":
        raise ServeError(409, f"the name {name!r} is taken by the base model; pick another", param="lora_name")
    return name


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(root: Optional[str], given: object) -> str:
    """The real path of adapter folder ``given`` if it lies inside ``root``, else an error.

    ``given`` may be relative (to ``root``) or absolute. The folder and every adapter file in it are
    resolved (symbolic links followed, ``..`` collapsed) and must stay under the resolved root, so neither
    ``../x`` nor a link inside the root pointing out of it reaches other folders.

    Raises:
        ServeError: 403 when runtime loading is off (no root) or the path leaves the root; 400 for a
            malformed path; 404 when the folder does not exist.
    """
    if root is None:
        raise ServeError(403, "loading adapters at run time is off: start the server with --adapter-root DIR")
    if not isinstance(given, str) or not given or "\x00" in given:
        raise ServeError(400, "lora_path must be a non-empty path string", param="lora_path")
    real_root = Path(root).resolve(strict=True)
    candidate = Path(os.path.expanduser(given)) if os.path.isabs(os.path.expanduser(given)) else real_root / given
    try:
        real = candidate.resolve()  # links that exist are followed; a missing tail is kept as written
    except (OSError, RuntimeError) as exc:  # a link loop, a name too long
        raise ServeError(400, f"adapter path {given!r} cannot be resolved: {exc}", param="lora_path") from None
    # Containment first: a path outside the root gets a 403 whether or not it exists, so clients
    # cannot probe which folders exist elsewhere on the machine.
    if not _inside(real, real_root):
        raise ServeError(403, f"adapter path {given!r} is outside the adapter root", param="lora_path")
    if not real.exists():
        raise ServeError(404, f"adapter folder {given!r} does not exist under the adapter root", param="lora_path")
    if not real.is_dir():
        raise ServeError(400, f"adapter path {given!r} is not a folder", param="lora_path")
    real = Path(adapter_folder(str(real))).resolve()
    if not _inside(real, real_root):  # a run folder whose adapter/ links out
        raise ServeError(403, f"adapter path {given!r} is outside the adapter root", param="lora_path")
    for name in ADAPTER_FILES:  # a file in the folder may itself be a link leading out of the root
        file = real / name
        if file.exists() and not _inside(file.resolve(), real_root):
            raise ServeError(403, f"{name} in {given!r} links outside the adapter root", param="lora_path")
    return str(real)


def adapter_folder(path: str) -> str:
    """``path`` itself, or its ``adapter/`` sub-folder when ``path`` is a ``deltatune train`` run folder."""
    if not os.path.isfile(os.path.join(path, ADAPTER_FILES[0])) and os.path.isfile(
            os.path.join(path, "adapter", ADAPTER_FILES[0])):
        return os.path.join(path, "adapter")
    return path


def sibling_file(folder: str, name: str, root: Optional[str]) -> Optional[str]:
    """``folder/../name`` (e.g. a run's ``metrics.json`` next to its ``adapter/``) if it exists and, when
    ``root`` is given, lies inside it; else None."""
    path = (Path(folder).parent / name).resolve()
    if not path.is_file():
        return None
    if root is not None and not _inside(path, Path(root).resolve()):
        return None
    return str(path)
