"""Reusable lab helpers for sipguard end-to-end tests and demos.

Everything here must run as root and only ever touches network namespaces it
creates itself (name prefix ``sgl-``) with addresses from 198.18.0.0/15.  The
host's own firewall, routes and interfaces are never modified.

Modules:

* :mod:`tests.lab.netns`    -- network namespaces, a bridged "hub" topology,
  process tracking with guaranteed cleanup.
* :mod:`tests.lab.kamailio` -- run Kamailio with ``examples/kamailio`` config,
  logging through a private rsyslogd (chosen template) or to stderr (``-E``).
* :mod:`tests.lab.sip`      -- tiny hand-made SIP/UDP client (REGISTER with
  digest auth, OPTIONS, malformed variants) that can send from a namespace.

Typical use::

    from tests.lab.netns import Lab
    from tests.lab.kamailio import Kamailio
    from tests.lab.sip import SipClient

    with Lab("demo") as lab:                       # sgl-demo-hub, 198.18.0.1
        with Kamailio(lab.hub, lab.proxy_ip, logmode="rsyslog",
                      template="RSYSLOG_TraditionalFileFormat",
                      logfile="/tmp/k.log") as k:
            c = lab.add_client("198.18.0.20")       # its own namespace
            with SipClient(server=lab.proxy_ip, netns=c.name,
                           local_ip="198.18.0.20") as sip:
                sip.register("1000", "sipguard.test", password="wrong")
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO_ROOT / "examples" / "kamailio"
NS_PREFIX = "sgl-"
# every prefix a test namespace may carry: the lab, the e2e test and the demo, the ops tests, the
# kernel enforcer tests (tests/netns_util.py), the firewall tests and the Kamailio versions test
# (tests/test_kamailio_versions.py, tests/lab/capture_k60.py)
NS_PREFIXES = ("sgl-", "sge2e-", "sgdemo-", "sgo-", "sge-", "sgf-", "sgk60-")
