"""``ferflow export``: every variant and the soft vote of a trained ensemble in one ONNX file.

    ferflow export --models results/models --out ensemble.onnx [--config config.yaml]

The graph (:class:`ferflow.inference.EnsembleNet`, exported with ``torch.onnx.export``'s
TorchScript exporter, opset 17, dynamic batch) takes ``images``: uint8 RGB face crops
N x 3 x S x S and gives ``probs`` (N x 8, the soft vote), ``va`` (N x 2), and each variant's
``variant_probs`` (N x V x 8) and ``variant_va`` (N x V x 2). The file's metadata (key
``ferflow``, JSON; see :func:`ferflow.inference.onnx_metadata`) holds the class names, the input
size, the preprocessing and crop settings, the smoothing windows chosen on validation and the
variants with their weights, so ``ferflow annotate --onnx ensemble.onnx`` needs nothing else.
Variant weights come from ``--config`` (``variants[].weight``), the smoothing windows from
``--metrics`` (default: ``<models>/../evaluation/metrics.json`` when it exists).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch

from .atomic import atomic_path
from .inference import ONNX_METADATA_KEY, ONNX_OUTPUTS, InferenceError, load_ensemble, onnx_metadata
from .extract import ExtractSettings
from .run_config import RunConfig, add_run_arguments, from_args

log = logging.getLogger("ferflow.export")
OPSET = 17
#: The extraction settings that decide a crop (stored in the file's metadata).
CROP_KEYS = ("detector", "detect_size", "min_score", "margin", "crop_size", "detect_every", "max_jump_iou", "align")


def crop_settings(extract: Mapping) -> dict:
    """The crop-deciding extraction settings: ``extract`` over :class:`ferflow.extract.ExtractSettings`'
    defaults (ValueError for an unknown key)."""
    settings = asdict(ExtractSettings.from_json(json.dumps(dict(extract))))
    return {k: settings[k] for k in CROP_KEYS}


def export_onnx(models_dir: str | os.PathLike, out: str | os.PathLike, weights: Mapping[str, float] | None = None,
                smoothing: Mapping[str, int] | None = None, crop: Mapping | None = None) -> dict:
    """Write the ensemble of ``models_dir`` to ``out`` (atomically) and return its metadata.

    Raises :class:`ferflow.inference.InferenceError` for an unusable models folder.
    """
    import onnx

    net = load_ensemble(models_dir, weights, device="cpu")
    size = net.members[0].input_size
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    metadata = onnx_metadata(net.members, smoothing or {}, crop or {})
    dynamic = {name: {0: "batch"} for name in ("images", *ONNX_OUTPUTS)}
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            # the tracer warns about the model's Python-level shape checks, which are constant here
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=list(ONNX_OUTPUTS),
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata, sort_keys=True)
        onnx.save(model, str(tmp))
    return metadata


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferflow export", description=__doc__.split("\n\n")[0].strip("` "))
    p.add_argument("--models", default="results/models", help="the training outputs: <variant>/model.pt")
    p.add_argument("--out", required=True, help="ONNX file to write")
    add_run_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        run: RunConfig = from_args(args, args.models)
        metadata = export_onnx(args.models, args.out, run.weights, run.smoothing, crop_settings(run.extract))
    except (InferenceError, ValueError, FileNotFoundError) as exc:
        print(f"ferflow export: error: {exc}", file=sys.stderr)
        return 2
    names = [v["name"] for v in metadata["variants"]]
    log.info("wrote %s: %d variants %s, input %s, smoothing %s", Path(args.out), len(names), names,
             metadata["input"]["shape"], {k: metadata["smoothing"][k] for k in ("expr", "va")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
