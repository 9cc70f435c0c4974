# sipguard — the two quick-start commands are `make demo` (set up and run the main job) and
# `make test` (set up and pass the tests). Both are idempotent and never touch the host's firewall.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-venv iproute2 iptables ipset nftables kamailio rsyslog sipvicious procps redis-server redis-sentinel openssl chromium systemd fail2ban python3-pyinotify faketime gcc libc6-dev logrotate sip-tester \
  systemd-container debootstrap lintian dpkg-dev zstd
PYTEST_ARGS ?=
# The distribution's interpreter (the one python3-venv is installed for, and fail2ban runs on)
SYSTEM_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)

.PHONY: setup apt venv test demo demo-host deb bench clean

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\n# sipguard make: packages install without starting their services\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod +x /usr/sbin/policy-rc.d; guard=1; fi; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; rc=$$?; \
	  [ -n "$$guard" ] && rm -f /usr/sbin/policy-rc.d; \
	  exit $$rc; \
	fi
	@# fail2ban is here for the benchmarks only (run privately in namespaces): never the host's service.
	@systemctl disable --now fail2ban >/dev/null 2>&1 || true

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks side by side with fail2ban (bench/README.md); writes bench/RESULTS.md and bench/latency.png.
bench: setup
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) bench/cluster_bench.py   # appends the "## Cluster" section to bench/RESULTS.md
	$(PY) -m bench.load   # SIPp phones + attacks against the real Kamailio: the "## Load" section of bench/RESULTS.md

demo: setup
	$(PY) -m tests.e2e.demo

# The Debian package: dist/sipguard_<version>~deb<N>_<arch>.deb, built in a clean debootstrap root of DIST
# (bookworm = Debian 12, trixie = Debian 13; default: this machine's), cached as a tar.zst under
# /var/cache/sipguard-build (or $$SIPGUARD_BUILD_CACHE). Needs root (debootstrap, systemd-nspawn).
DIST ?=
deb: apt
	python3 packaging/build_deb.py $(if $(DIST),--dist $(DIST))

# The .deb installed on a real systemd host (a Debian 12, then 13 container with systemd as PID 1 in a lab
# namespace, Kamailio as kamailio.service logging to the journal), attacked, restarted, rebooted, upgraded,
# removed and purged: the steps of tests/test_installed.py, printed as they go.
demo-host: setup
	$(PY) -m pytest tests/test_installed.py -s -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
