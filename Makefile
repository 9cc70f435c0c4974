# sipguard — the two quick-start commands are `make demo` (set up and run the main job) and
# `make test` (set up and pass the tests). Both are idempotent and never touch the host's firewall.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv iproute2 iptables ipset nftables kamailio rsyslog sipvicious procps redis-server chromium systemd
PYTEST_ARGS ?=

.PHONY: setup apt venv test demo clean

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@# Debian starts services on install; the tests run their own, never the system's.
	@systemctl disable --now kamailio >/dev/null 2>&1 || true
	@systemctl disable --now redis-server >/dev/null 2>&1 || true
	@service redis-server stop >/dev/null 2>&1 || true

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m tests.e2e.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
