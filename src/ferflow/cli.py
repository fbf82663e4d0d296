"""The ``ferflow`` command: one subcommand per stage, ``ferflow STAGE ...`` = ``python -m ferflow.STAGE ...``.

    ferflow --help                 # the subcommands
    ferflow annotate --help        # one subcommand's options
    ferflow --version
    python -m ferflow STAGE ...    # the same (ferflow/__main__.py)

Each subcommand hands its arguments to the stage module's ``main``; the module is imported only
when its subcommand runs, so ``ferflow --help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

#: subcommand -> one line about it (the module is ferflow.<subcommand>)
COMMANDS = {
    "demo": "generate the demo data (small Aff-Wild2, AffectNet and ExpW copies)",
    "index": "one source in its native layout -> a manifest of annotated frames / images",
    "extract": "detect, track and crop the faces of one video (or image chunk)",
    "shards": "face crops of every source -> shuffled WebDataset shards, labels and accounting",
    "train": "train one bagged variant",
    "predict": "predict every sample of one split with a trained variant",
    "temporal": "train or run one variant's temporal head over its per-frame features",
    "evaluate": "fill, soft-vote, smooth and score the variants' predictions",
    "report": "the report's first page: metrics, per-video, class support and accounting tables; per-video figures",
    "annotate": "the trained ensemble on any video: per-frame table, plot, annotated video",
    "export": "every variant and the soft vote of the ensemble in one ONNX file",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ferflow", description="Facial expression and valence/arousal on video: the stages of the pipeline.",
        epilog="`ferflow STAGE ARGS` runs `python -m ferflow.STAGE ARGS`; `ferflow STAGE --help` lists its options.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version of ferflow and exit")
    sub = p.add_subparsers(dest="command", metavar="STAGE", required=True)
    for name, about in COMMANDS.items():
        sub.add_parser(name, help=about, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # --help, or a usage error naming the valid subcommands
        return 2
    module = importlib.import_module(f"ferflow.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
