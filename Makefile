# `make test` and `make demo` do all set-up themselves on a fresh machine:
# a virtual environment in .venv/ with torch 2.14.1 + torchvision 0.29.1 (from this
# machine kind's local wheel store), theseus-ai 0.2.3 built from its sdist, and dac.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dac-installed

.PHONY: test demo bench docs install-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=77" wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q numpy scipy pybind11 "semantic-version==2.10.0" torchlie torchkin "pytest>=7" \
		pydicom matplotlib tqdm scikit-learn pyyaml "monai>=1.6"
	# theseus-ai's setup.py imports torch (no isolation) and asks for scikit-sparse (skipped).
	THESEUS_FORCE_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps theseus-ai==0.2.3
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import dac, theseus; print('dac', dac.__version__, 'theseus', theseus.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q src tests

demo: $(STAMP)
	$(VENV)/bin/dac demo --out dac-demo

bench: $(STAMP)
	$(PY) benchmarks/speed.py

# The docs site (docs/ + API reference from the docstrings) into site/, strictly:
# a broken link or a docstring that does not render fails the build.
DOCS_STAMP := $(VENV)/.dac-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The README's install-into-your-own-environment recipe, in a fresh venv.
install-check:
	PYTHON=$(PYTHON) bash .ci/install-check

clean:
	rm -rf $(VENV) .pytest_cache site
