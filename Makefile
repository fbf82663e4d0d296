# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: install demo test test-fast lint report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	# retinaface-pytorch 0.0.8 pins torch==1.9.0; its network code runs on current torch.
	$(BIN)/pip install --quiet --no-deps 'retinaface-pytorch==0.0.8'
	# facenet-pytorch 2.6.0 (detector: mtcnn, weights in its wheel) pins torch<2.3; runs on current torch.
	$(BIN)/pip install --quiet --no-deps 'facenet-pytorch==2.6.0'
	touch $(STAMP)

# The rules call `python -m ferflow.<stage>`: the venv's python must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

demo: $(STAMP)
	snakemake --cores $(CORES)

test: $(STAMP)
	python -m pytest -q

test-fast: $(STAMP)
	python -m pytest -q -m "not slow"

lint: $(STAMP)
	snakemake --lint

report: $(STAMP)
	snakemake --report report.html

clean:
	rm -rf results logs demo_data .snakemake report.html
