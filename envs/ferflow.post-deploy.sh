#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) inside the new environment: retinaface-pytorch 0.0.8 pins
# torch==1.9.0 and facenet-pytorch 2.6.0 (detector: mtcnn) torch<2.3, so they go in without their
# dependencies (as in the Makefile); their network code runs on current torch.
set -euo pipefail
python -m pip install --quiet --no-deps 'retinaface-pytorch==0.0.8' 'facenet-pytorch==2.6.0'
