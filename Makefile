# Set-up on a fresh machine is two commands: `make demo` and `make test`.
# Both create (or reuse) .venv and install everything they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdistill-installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install fashion-mnist bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's package of Fashion-MNIST; without apt the demo downloads it through torchvision.
fashion-mnist:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not apt-get install dataset-fashion-mnist; torchvision will download it"; \
	fi

demo: $(STAMP) fashion-mnist
	$(VENV)/bin/kdistill demo

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
