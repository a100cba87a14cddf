# Plankton Lens — the two commands: `make demo` (set up + run the dashboard), `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install data-info browser

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

data-info: $(STAMP)
	@$(PY) -m data info || true

# Debian's Chromium for the browser tests (never a browser download); skipped when not root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped (apt-get install chromium)"; }

demo: $(STAMP) data-info
	HF_HUB_OFFLINE=1 $(PY) -m streamlit run serve.py --browser.gatherUsageStats=false

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests
