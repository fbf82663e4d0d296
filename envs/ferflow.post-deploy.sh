#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) inside the new environment: retinaface-pytorch 0.0.8 pins
# torch==1.9.0, so it goes in without its dependencies (as in the Makefile); its network code runs
# on current torch.
set -euo pipefail
python -m pip install --quiet --no-deps 'retinaface-pytorch==0.0.8'
