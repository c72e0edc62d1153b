"""Checksummed ``torch.save`` files: corruption and truncation are detected and named on load.

``torch.load`` does not verify the CRC-32s of the zip archive it reads, so a flipped byte inside
tensor data loads silently. ``save_checked`` therefore stores the object inside a small wrapper,
itself an ordinary ``torch.save`` file that ``torch.load(path, weights_only=True)`` reads::

    {"format": "lmlp.checked",     # marks a checksummed file
     "version": 1,                 # of this wrapper layout
     "sha256": "<64 hex digits>",  # SHA-256 of the payload bytes
     "payload": <1-D uint8 tensor>}  # the bytes of torch.save(obj)

The payload is a uint8 tensor rather than ``bytes``: it is stored as raw bytes in the archive,
whereas pickle protocol 2 (torch.save's default) writes ``bytes`` as a latin-1 string inside the
pickle. ``load_checked`` recomputes the SHA-256 before unpickling the payload (with
``weights_only=True``). Files without the wrapper (plain ``torch.save`` dictionaries, written by
lmlp before checksums) still load; for them the zip CRC-32s of the archive members are verified
instead.

With ``keep_previous=True`` the file being replaced, if intact, is kept as ``<stem>.prev<suffix>``
(``checkpoint_last.pt`` → ``checkpoint_last.prev.pt``), so one older complete file always exists;
``load_with_fallback`` falls back to it when the newer one is damaged.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlp.errors import LmlpError
from lmlp.fileio import atomic_path

FORMAT = "lmlp.checked"
VERSION = 1
_WRAPPER_KEYS = ("sha256", "payload")
_ZIP_MAGIC = b"PK\x03\x04"


class _Damaged(Exception):
    """A file is missing or bad; ``str(self)`` is the problem, without the path."""


def previous_path(path: str | os.PathLike) -> Path:
    """The sibling that keeps the previous version of ``path``: ``<stem>.prev<suffix>``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


def save_checked(obj: dict[str, Any], path: str | os.PathLike, *, keep_previous: bool = False) -> None:
    """Write ``obj`` (anything ``torch.save`` takes) to ``path`` atomically with its SHA-256.

    With ``keep_previous``, an intact existing ``path`` is moved to ``previous_path(path)`` just
    before the new file takes its place; a damaged one is overwritten and the older ``.prev`` kept.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    view = buffer.getbuffer()
    wrapper = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(view).hexdigest(),
               "payload": torch.frombuffer(view, dtype=torch.uint8)}
    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save(wrapper, tmp)
        if keep_previous and target.is_file() and _intact(target):
            os.replace(target, previous_path(target))


def load_checked(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The dictionary saved in ``path`` after verifying its checksum.

    ``what`` names the kind of file in messages ("model file", "checkpoint"). Raises ``LmlpError``
    with one line ``"<path>: <problem>"`` when the file is missing, empty, truncated or unreadable,
    fails its checksum ("<what> corrupted: checksum mismatch"), or is not an lmlp file.
    """
    try:
        return _read(Path(path), what)
    except _Damaged as exc:
        raise LmlpError(f"{path}: {exc}") from None


def load_with_fallback(path: str | os.PathLike, what: str,
                       warn: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    """``load_checked(path)``, or the previous version of ``path`` when ``path`` is bad.

    Returns the dictionary and the file it came from. On falling back, ``warn`` gets one line
    ``"<path>: <problem>; falling back to <prev>"``. Raises ``LmlpError`` with the problem of
    ``path`` when there is no previous version, and with the problems of both when that is bad too.
    """
    path = Path(path)
    try:
        return _read(path, what), path
    except _Damaged as exc:
        problem = str(exc)
    previous = previous_path(path)
    if not previous.exists():
        raise LmlpError(f"{path}: {problem}")
    try:
        content = _read(previous, what)
    except _Damaged as exc:
        raise LmlpError(f"{path}: {problem}; the previous version {previous}: {exc}") from None
    warn(f"{path}: {problem}; falling back to {previous}")
    return content, previous


def _intact(path: Path) -> bool:
    """Whether ``path`` passes its checks (the checksummed payload is not unpickled)."""
    try:
        _read(path, "file", unpickle_payload=False)
    except _Damaged:
        return False
    return True


def _read(path: Path, what: str, unpickle_payload: bool = True) -> dict[str, Any]:
    """The verified content of ``path``; ``_Damaged`` naming the problem otherwise."""
    if not path.is_file():
        raise _Damaged(f"no such {what}")
    with open(path, "rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    if not head:
        raise _Damaged(f"{what} is empty (truncated?)")
    if head != _ZIP_MAGIC:
        raise _Damaged(f"not an lmlp {what} (not a zip-format PyTorch file)")
    outer = _torch_load(path, what)
    if not isinstance(outer, dict):
        raise _Damaged(f"not an lmlp {what}")
    if outer.get("format") != FORMAT and not any(key in outer for key in _WRAPPER_KEYS):
        _check_zip_crcs(path, what)  # a file written before checksums
        return outer
    payload = _verified_payload(outer, what)
    if not unpickle_payload:
        return {}
    content = _torch_load(io.BytesIO(payload.numpy()), what)
    if not isinstance(content, dict):
        raise _Damaged(f"not an lmlp {what}")
    return content


def _torch_load(source: Path | io.BytesIO, what: str) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU; ``_Damaged`` when that fails.

    torch's warnings (e.g. about an unexpected pickle protocol in a damaged file) are silenced:
    the problem is reported in the one-line error instead.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        text = str(exc).strip()
        detail = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
        raise _Damaged(f"not a readable {what} (truncated or corrupted?): {detail}") from None


def _verified_payload(wrapper: dict[str, Any], what: str) -> torch.Tensor:
    """The payload tensor of a checksummed file whose SHA-256 matches; ``_Damaged`` otherwise."""
    version, digest, payload = wrapper.get("version"), wrapper.get("sha256"), wrapper.get("payload")
    if wrapper.get("format") == FORMAT and isinstance(version, int) and version > VERSION:
        raise _Damaged(f"{what} written by a newer lmlp (checksummed-file version {version}, this lmlp "
                       f"reads {VERSION}); upgrade lmlp")
    if (wrapper.get("format") != FORMAT or version != VERSION or not isinstance(digest, str)
            or not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1):
        raise _Damaged(f"{what} corrupted: damaged checksum header")
    if hashlib.sha256(payload.numpy()).hexdigest() != digest:
        raise _Damaged(f"{what} corrupted: checksum mismatch (its content does not match the stored SHA-256)")
    return payload


def _check_zip_crcs(path: Path, what: str) -> None:
    """``_Damaged`` when a member of the zip archive ``path`` fails its CRC-32.

    Members with a CRC of 0 are skipped: torch writes 0 when its ``compute_crc32`` option is off.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 24):
                        pass
    except zipfile.BadZipFile as exc:
        kind = "checksum mismatch" if "CRC" in str(exc) else "damaged archive"
        raise _Damaged(f"{what} corrupted: {kind} ({exc})") from None
    except (OSError, EOFError, ValueError) as exc:
        raise _Damaged(f"not a readable {what} (truncated or corrupted?): {exc}") from None
