#!/usr/bin/env python3
"""Regenerate the checked-in KFP component YAMLs (components/stepguard_kfp/yaml/).

    .venv/bin/python scripts/compile_components.py                # rewrite the YAMLs
    .venv/bin/python scripts/compile_components.py --check        # exit 1 if any is stale
    .venv/bin/python scripts/compile_components.py --image REPO@sha256:<hex>
    .venv/bin/python scripts/compile_components.py --image-from-settings --out DIR

``--image`` is what a release runs after pushing the runtime image: the YAMLs then reference
exactly that digest. ``--image-from-settings`` takes the one image setting (``pods.image`` /
``STEPGUARD_PODS_IMAGE``), as the Python API does. Either way the written YAMLs are refused if
they still name the all-zero placeholder. The image itself is built from
components/image/Containerfile. Without either, the checked-in YAMLs keep the placeholder
(deterministic, and unpullable: they fail closed until a release pins them).
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
    from stepguard_kfp._components import IMAGE
    from stepguard_kfp._image import DEFAULT_IMAGE, check_pinned
    from stepguard_kfp._imageref import assert_ir_runnable

    out_dir.mkdir(parents=True, exist_ok=True)
    target = check_pinned(image) if image is not None else DEFAULT_IMAGE
    written = []
    for name in stepguard_kfp.COMPONENT_NAMES:
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(getattr(stepguard_kfp, name), str(path))
        text = path.read_text()
        # The components carry the setting's image (or the placeholder) from import time.
        path.write_text(text.replace(IMAGE, target))
        if image is not None:
            assert_ir_runnable(path)
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
    p.add_argument("--image-from-settings", action="store_true",
                   help="use the pods.image setting (STEPGUARD_PODS_IMAGE)")
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
    image = args.image
    if args.image_from_settings:
        from stepguard_kfp._imageref import configured_image

        image = configured_image()
        if image is None:
            p.error("--image-from-settings: pods.image is not set (STEPGUARD_PODS_IMAGE)")
    for path in compile_all(args.out, image):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
