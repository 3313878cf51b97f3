"""Unsafe serialization formats: pickle-based files are refused unless a policy allows them.

Nothing here unpickles. Detection reads names and a few header bytes; allowed pickles are handed
to two independent static scanners (fickling and picklescan) in subprocesses, and any finding,
error or non-zero exit of either one is a refusal. Scanners are a tripwire behind the signature,
not a boundary: denylist scanners have missed real payloads before.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from stepguard.errors import PolicyViolation

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt",
                             ".dill", ".npz", ".mar", ".h5pkl"})
SCANNER_TIMEOUT_S = 120.0


def _npy_has_objects(path: Path) -> bool | None:
    """True/False from the .npy header (never the data); None when the header is unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(10)
            if head[:6] != b"\x93NUMPY":
                return None
            major = head[6]
            if major == 1:
                hlen = int.from_bytes(head[8:10], "little")
            else:
                hlen = int.from_bytes(head[8:10] + fh.read(2), "little")
            header = fh.read(min(hlen, 65536)).decode("latin-1")
        meta = ast.literal_eval(header)  # a dict literal; literal_eval evaluates no code
        descr = meta.get("descr") if isinstance(meta, dict) else None
    except (OSError, ValueError, SyntaxError, UnicodeDecodeError):
        return None
    return "O" in repr(descr)


def pickle_reason(rel: str, path: Path) -> str | None:
    """Why ``path`` is pickle-based (or None when it is not)."""
    # A single-file model is named "." in the statement: judge it by its real name.
    suffix = Path(path.name if rel == "." else rel).suffix.lower()
    if suffix == ".npy":
        objects = _npy_has_objects(path)
        if objects is None:
            return "unreadable .npy header"
        return "object array in .npy (pickle)" if objects else None
    if suffix in PICKLE_SUFFIXES:
        return f"pickle-based format ({suffix})"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return "unreadable file"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle data (protocol header)"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith((".pkl", "data.pkl")) for n in zf.namelist()):
                    return "zip archive containing pickles (torch format)"
        except (zipfile.BadZipFile, OSError):
            return None
    return None


def _scanner(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def scan_pickle(path: Path) -> list[str]:
    """Findings from fickling and picklescan (empty when both pass). Never unpickles."""
    findings: list[str] = []
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    for name, args in (("fickling", ["--check-safety", str(path)]),
                       ("picklescan", ["--strict", "-p", str(path)])):
        exe = _scanner(name)
        if exe is None:
            findings.append(f"{name} is not installed (a pickle cannot be cleared without it)")
            continue
        try:
            # fickling writes a safety_results.json into its working directory: keep that out
            # of the caller's tree.
            with tempfile.TemporaryDirectory(prefix="stepguard-scan-") as scratch:
                proc = subprocess.run([exe, *args], capture_output=True,
                                      timeout=SCANNER_TIMEOUT_S, env=env, check=False,
                                      stdin=subprocess.DEVNULL, cwd=scratch)
        except (OSError, subprocess.TimeoutExpired) as exc:
            findings.append(f"{name} failed: {type(exc).__name__}")
            continue
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
            tail = "; ".join(line.strip() for line in out[-3:] if line.strip())[:300]
            findings.append(f"{name} exit {proc.returncode}: {tail}")
    return findings


def check_formats(files: Mapping[str, Path], *, allow_pickle: bool) -> list[str]:
    """Refuse pickle-based files (or, if allowed, those either scanner flags). Raises."""
    refused: list[str] = []
    scanned: list[str] = []
    for rel in sorted(files):
        reason = pickle_reason(rel, files[rel])
        if reason is None:
            continue
        label = files[rel].name if rel == "." else rel
        if not allow_pickle:
            refused.append(f"{label}: {reason}")
            continue
        for finding in scan_pickle(files[rel]):
            refused.append(f"{label}: {finding}")
        scanned.append(label)
    if refused:
        raise PolicyViolation(
            "unsafe model format refused" if not allow_pickle
            else "pickle scanners refused the model",
            subject=refused[0].split(":", 1)[0], details=refused,
            hint=None if allow_pickle else
            "convert to safetensors/ONNX, or use a policy with allow_pickle=True (then every "
            "pickle must pass fickling and picklescan)")
    return scanned
