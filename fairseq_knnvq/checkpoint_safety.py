"""Loading fairseq checkpoints with torch's weights-only unpickler, and saying why a
file is refused.

torch >= 2.6 loads with ``weights_only=True`` by default: the unpickler builds tensors,
containers and numbers, and refuses every other Python global, since unpickling one
can run code. fairseq checkpoints hold two harmless classes besides those:

- ``argparse.Namespace``: the ``args`` of checkpoints written by fairseq before hydra
  (the official ``wav2vec_small.pt``, ``fairseq-train`` of fairseq <= 0.10);
- ``fairseq.data.dictionary.Dictionary``: the target dictionary in a fine-tuning
  checkpoint's ``task_state``.

:func:`allow_fairseq_checkpoint_classes` adds exactly these to torch's allow-list
(``torch.serialization.add_safe_globals``), so those checkpoints load, resume and
fine-tune with the documented commands and no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
Anything else stays refused, and :func:`describe_load_error` turns torch's refusal
into a message that names the blocked global and says that the file may be malicious
(never the advice to turn the check off); a file that is neither a zip archive nor a
pickle is called what it is: not a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from typing import List, Optional

# A pickle of protocol 2 or higher starts with the PROTO opcode; torch's legacy
# (pre-1.6) format is such a pickle, its current format a zip archive.
_PICKLE_PROTO = b"\x80"
_BLOCKED_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")


def harmless_checkpoint_classes() -> List[type]:
    """The classes (besides tensors, containers and numbers) that fairseq checkpoints
    hold and that unpickle without running code of the file."""
    from fairseq.data.dictionary import Dictionary

    return [argparse.Namespace, Dictionary]


def allow_fairseq_checkpoint_classes() -> None:
    """Adds :func:`harmless_checkpoint_classes` to torch's weights-only allow-list
    (process-wide; safe to call more than once)."""
    import torch

    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything anyway
        add_safe_globals(harmless_checkpoint_classes())


def file_kind(path: str) -> str:
    """``"zip"`` (torch's format), ``"truncated zip"`` (a zip header but no readable
    central directory: an interrupted copy or a full disk), ``"pickle"`` (torch's
    legacy format), ``"empty"`` or ``"other"``."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return "truncated zip"
        return "zip"
    if head.startswith(_PICKLE_PROTO):
        return "pickle"
    return "other"


def blocked_globals(error: BaseException) -> List[str]:
    """The globals torch's weights-only unpickler refused, read from its message."""
    return sorted(set(_BLOCKED_GLOBAL.findall(str(error))))


def describe_load_error(path: str, error: BaseException, what: str = "") -> str:
    """One message for a checkpoint ``path`` that ``torch.load`` refused with ``error``.
    ``what`` names the option that gave the path (``"model.w2v_path "``, with its space)."""
    name = f"{what}{path}"
    kind = file_kind(path) if os.path.isfile(path) else "missing"
    if kind == "missing":
        return f"{name} does not exist"
    if kind == "empty":
        return f"{name} is empty (0 bytes): not a checkpoint (an interrupted copy or download?)"
    if kind == "truncated zip":
        return (
            f"{name} is truncated or damaged (its zip directory cannot be read: an interrupted "
            f"copy, a full disk or a partial download)"
        )
    if kind == "other":
        return f"{name} is not a checkpoint: neither a PyTorch zip archive nor a pickle"
    found = blocked_globals(error) if isinstance(error, pickle.UnpicklingError) else []
    if found:
        return (
            f"{name} holds {', '.join(found)}, which is none of the classes a fairseq checkpoint "
            f"holds (tensors, numbers, containers, argparse.Namespace, fairseq's Dictionary); "
            f"torch's weights-only loading refused it because unpickling it can run code. The file "
            f"may be malicious: do not turn torch's weights-only check off to load it; use a "
            f"checkpoint written by fairseq training"
        )
    detail = str(error).strip().splitlines()
    detail = detail[-1] if detail else type(error).__name__
    if isinstance(error, pickle.UnpicklingError):
        return f"{name} is not a checkpoint torch can read ({detail})"
    return f"{name} could not be read as a checkpoint ({type(error).__name__}: {detail})"


def load_error_message(path: str, what: str = "") -> Optional[str]:
    """``None`` when ``torch.load(path)`` (weights only) succeeds, else
    :func:`describe_load_error`'s message. The tensors of a zip checkpoint are
    memory-mapped, so this reads its pickle, not its weights."""
    import torch

    try:
        torch.load(path, map_location="cpu", mmap=file_kind(path) == "zip", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is no checkpoint
        return describe_load_error(path, error, what)
    return None


def damage_message(path: str) -> Optional[str]:
    """For a zip checkpoint: a message naming the first member whose CRC does not match
    (a bit flipped on disk or in a copy, which ``torch.load`` does not check: it loads
    the wrong weights), else ``None``. Reads the whole file."""
    if file_kind(path) != "zip":
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"{path} is damaged ({error})"
    return None if bad is None else f"{path} is damaged: its part {bad} fails its CRC check (a disk or copy error)"
