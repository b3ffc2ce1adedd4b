"""The learned demo model's data bundle (docs/demo-model.md).

    python scripts/demo_model.py init out/demo-model/data-bundle   # random `demo` bundle: codec + audio encoder

The bundle holds what preprocessing tokenizes with: the lossless space-to-depth codec (48×48 frames
-> 48 channels at 12×12) and the small random-initialised wav2vec2. Figures for a trained model come
from the evaluation job (jobs/evaluate.py).
"""

from __future__ import annotations

import argparse
import sys

from letstalk.pipeline import LetsTalkPipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("init", help="save the random-initialised `demo` data bundle (codec + audio encoder)")
    q.add_argument("dir")
    q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(LetsTalkPipeline.init_demo(seed=args.seed).save_pretrained(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
