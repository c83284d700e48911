#!/usr/bin/env python
"""Average pipeline components over snapshots of one lineage (``imagen_lite.training.averaging``).

    # the Imagen base (T5 + UNet together) averaged over two snapshots, the rest of the pipeline as shipped
    python scripts/average_checkpoints.py --base imagen_lite/weights/imagen --components unet text_encoder \
        --snapshots SNAP_24366 SNAP_31343 --out /tmp/avg/imagen

A snapshot is any folder holding the named components in diffusers/transformers layout (a
pipeline folder, a ``wip/`` export, or the components extracted from git history with
``git show COMMIT:path``). ``--weights`` gives one weight per snapshot (default: equal).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imagen_lite.training.averaging import average_pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="pipeline folder copied for everything not averaged")
    parser.add_argument("--components", nargs="+", required=True, help="component folders to average, e.g. unet text_encoder")
    parser.add_argument("--snapshots", nargs="+", type=Path, required=True, help="folders holding those components")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one per snapshot (default: equal)")
    parser.add_argument("--out", type=Path, required=True, help="new folder to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        record = average_pipeline(args.base, args.snapshots, args.components, args.out, args.weights)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
