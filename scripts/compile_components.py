#!/usr/bin/env python3
"""Regenerate the checked-in KFP component YAMLs (components/stepguard_kfp/yaml/).

    .venv/bin/python scripts/compile_components.py                # rewrite the YAMLs
    .venv/bin/python scripts/compile_components.py --check        # exit 1 if any is stale
    .venv/bin/python scripts/compile_components.py --image REPO@sha256:<hex>

``--image`` is what a release runs after pushing the runtime image: the YAMLs then reference
exactly that digest. The image itself is built elsewhere (components/image/Containerfile).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
YAML_DIR = ROOT / "components" / "stepguard_kfp" / "yaml"


def compile_all(out_dir: Path, image: str | None = None) -> list[Path]:
    """Compile every component into ``out_dir``; returns the written paths."""
    from kfp import compiler

    import stepguard_kfp
    from stepguard_kfp._image import DEFAULT_IMAGE, check_pinned

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in stepguard_kfp.COMPONENT_NAMES:
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(getattr(stepguard_kfp, name), str(path))
        if image is not None:
            text = path.read_text()
            path.write_text(text.replace(DEFAULT_IMAGE, check_pinned(image)))
        written.append(path)
    return written


def stale(reference: Path = YAML_DIR) -> list[str]:
    """Unified diffs between freshly compiled YAMLs and ``reference`` (empty: up to date)."""
    diffs: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_all(Path(tmp))
        names = {p.name for p in fresh} | {p.name for p in reference.glob("*.yaml")}
        for name in sorted(names):
            new = Path(tmp) / name
            old = reference / name
            a = old.read_text().splitlines(keepends=True) if old.exists() else []
            b = new.read_text().splitlines(keepends=True) if new.exists() else []
            if a != b:
                diffs.append("".join(difflib.unified_diff(
                    a, b, f"checked-in/{name}", f"compiled/{name}")))
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if the checked-in YAMLs are stale")
    p.add_argument("--image", help="runtime image pinned by digest (repo@sha256:<hex>)")
    p.add_argument("--out", type=Path, default=YAML_DIR, help="output directory")
    args = p.parse_args(argv)
    if args.check:
        diffs = stale(args.out)
        for d in diffs:
            sys.stdout.write(d)
        if diffs:
            print("stale component YAMLs: run scripts/compile_components.py", file=sys.stderr)
            return 1
        print("component YAMLs are up to date")
        return 0
    for path in compile_all(args.out, args.image):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
