"""Unsafe serialization formats: pickle-based files are refused unless a policy allows them.

Nothing here unpickles. Detection is by content (:mod:`stepguard.signing._content`): pickle
streams of every protocol, inside gzip/bzip2/xz/zlib wrappers and inside every zip member,
object-dtype numpy arrays; a pickle suffix (``.pkl``, ``.pt``, ...) is refused whatever the bytes
say. Content that cannot be opened to look (zstd, lz4, encrypted zip members) is refused the same
way. A policy may also name a format allow-list (``formats``): then every file must be
recognised as one of those kinds, and anything unrecognised is refused rather than let through.

Allowed pickles are handed to two independent static scanners (fickling and picklescan) in
subprocesses, and any finding, error or non-zero exit of either one is a refusal. Scanners are a
tripwire behind the signature, not a boundary: denylist scanners have missed real payloads before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.signing._content import KINDS, sniff

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt",
                             ".dill", ".npz", ".mar", ".h5pkl"})
SCANNER_TIMEOUT_S = 120.0


#: What a format allow-list may name.
ALLOWABLE_FORMATS = KINDS - {"pickle", "uninspectable", "unknown"}


def check_allowed_formats(formats: Collection[str] | None) -> tuple[str, ...] | None:
    """Validate a policy's format allow-list (None: no allow-list).

    >>> check_allowed_formats(["safetensors", "json"])
    ('json', 'safetensors')
    >>> check_allowed_formats(["pickle"])
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: not a format an allow-list can name: pickle
    """
    if formats is None:
        return None
    out = tuple(sorted({str(f).strip().lower() for f in formats}))
    bad = [f for f in out if f not in ALLOWABLE_FORMATS]
    if bad or not out:
        raise ConfigurationError("not a format an allow-list can name", subject=",".join(bad),
                                 hint="one or more of " + ", ".join(sorted(ALLOWABLE_FORMATS)))
    return out


def pickle_reason(rel: str, path: Path) -> str | None:
    """Why ``path`` is (or may hide) pickle data, or None when its content is not pickle-based."""
    # A single-file model is named "." in the statement: judge it by its real name.
    suffix = Path(path.name if rel == "." else rel).suffix.lower()
    found = sniff(path)
    if found.kind in ("pickle", "uninspectable"):
        return found.reason
    if suffix in PICKLE_SUFFIXES and not (suffix == ".npz" and found.kind == "numpy"):
        return f"pickle-based format ({suffix})"
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


def check_formats(files: Mapping[str, Path], *, allow_pickle: bool,
                  allowed_formats: Collection[str] | None = None) -> list[str]:
    """Refuse pickle-based files (or, if allowed, those either scanner flags), and with
    ``allowed_formats`` every file whose content is not one of those kinds. Raises."""
    refused: list[str] = []
    scanned: list[str] = []
    allowed = check_allowed_formats(allowed_formats)
    for rel in sorted(files):
        reason = pickle_reason(rel, files[rel])
        label = files[rel].name if rel == "." else rel
        if allowed is not None and reason is None:
            kind = sniff(files[rel]).kind
            if kind not in allowed:
                refused.append(f"{label}: {kind} content is not in the policy's format "
                               f"allow-list ({', '.join(allowed)})")
            continue
        if reason is None:
            continue
        if not allow_pickle:
            refused.append(f"{label}: {reason}")
            continue
        for finding in scan_pickle(files[rel]):
            refused.append(f"{label}: {finding}")
        scanned.append(label)
    if refused:
        raise PolicyViolation(
            "unsafe model format refused" if not allow_pickle or allowed is not None
            else "pickle scanners refused the model",
            subject=refused[0].split(":", 1)[0], details=refused,
            hint=None if allow_pickle else
            "convert to safetensors/ONNX, or use a policy with allow_pickle=True (then every "
            "pickle must pass fickling and picklescan)")
    return scanned
