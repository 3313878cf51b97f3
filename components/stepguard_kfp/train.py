"""Entrypoint of the ``secure_train_container`` component: ``python3 -m stepguard_kfp.train``.

It completes the training spec (dataset pinned to the verified digest, model output) and runs the
command through the step runner (``stepguard exec``), then writes the receipt and the model
manifest where KFP collects outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from stepguard.errors import ConfigurationError, StepguardError
from stepguard_kfp._runtime import secure_train_step


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the container component's arguments and run the secured training step."""
    p = argparse.ArgumentParser(prog="python3 -m stepguard_kfp.train")
    for name in ("step-spec", "command-json", "dataset-path", "dataset-manifest",
                 "dataset-receipt", "model-dir", "manifest-out", "receipt-out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--pipeline", default="kfp")
    p.add_argument("--run-id", default="")
    p.add_argument("--settings-path", default="")
    p.add_argument("--wrapped-credentials", default="")
    args = p.parse_args(argv)
    try:
        command = json.loads(args.command_json)
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise ConfigurationError("command must be a JSON list of strings", subject="command")
    except ValueError as exc:
        print("stepguard: error: command is not valid JSON: command", file=sys.stderr)
        raise SystemExit(2) from exc
    except StepguardError as err:
        print(f"stepguard: error: {err}", file=sys.stderr)
        return err.exit_code
    receipt = secure_train_step(
        step_spec=args.step_spec, command=command, dataset_path=args.dataset_path,
        dataset_manifest=args.dataset_manifest, dataset_receipt=args.dataset_receipt,
        model_dir=args.model_dir, manifest_out=args.manifest_out, pipeline=args.pipeline,
        run_id=args.run_id, settings_path=args.settings_path,
        wrapped_credentials=args.wrapped_credentials,
    )
    out = Path(args.receipt_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(receipt)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
