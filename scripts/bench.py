"""imagen-lite's benchmarks: sampling vs diffusers, quality per second, training vs imagen-pytorch, GPU.

The same as ``imagen-lite bench`` (see ``imagen_lite/cli_bench.py`` for the sections); this
script also hands it diffusers' deprecated ``UnCLIPPipeline`` as the unCLIP reference, which
the package itself never imports. Markdown on stdout, headed with the machine; ``--json`` for
every number.

    python scripts/bench.py --threads 1                                   # everything it can run here
    python scripts/bench.py --sections sampling --cases tiny --rounds 5 --threads 1
    python scripts/bench.py --sections quality --model-dir ~/.cache/imagen-lite/base_export --threads 1
    python scripts/bench.py --sections training --threads 1               # pip install 'imagen-lite[bench]' first

Beside other work on a shared machine keep ``--threads 1`` and read the ratios (paired,
interleaved; wall and CPU clocks), not the absolute seconds.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_generate import unclip_reference  # noqa: E402

from imagen_lite.cli_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(unclip_reference=unclip_reference()))
