"""Kamailio htable sync against a real Kamailio 5.6 (jsonrpcs + htable, the example config) in a
network namespace: a ban appears in `ipban` and Kamailio drops the source; unban removes it; a
restart reconciles the table with the store."""

import os
import shutil
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from sipguard.actions import manual_unban
from sipguard.config import Config
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.enforce.stack import EnforcerStack as Fanout
from sipguard.extras.htable import JsonRpc, dump_keys
from sipguard.model import Ban
from sipguard.store import Store
from waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("kamailio") is None,
                                 reason="needs root and kamailio")]

CLIENT = "198.18.0.31"


def test_dump_keys_shapes():
    res = [{"entry": 27, "size": 1, "slot": [{"name": "198.51.100.2", "value": 2, "type": "int"}]}]
    assert dump_keys(res) == {"198.51.100.2": 2}
    assert dump_keys([]) == {} and dump_keys(None) == {}


def test_fanout_mirror_failure_does_not_stop_kernel_ban():
    class Down:
        name = "htable"

        def ban(self, ban, now):
            raise OSError("kamailio is down")

    kernel = DryRunEnforcer()
    f = Fanout(kernel, [Down()])
    f.ban(Ban("198.51.100.1", "x", 0, None), 0)
    assert [e.ip for e in kernel.entries()] == ["198.51.100.1"] and f.mirror_errors == 1


@pytest.fixture
def kamailio():
    from tests.lab.kamailio import Kamailio
    from tests.lab.netns import Lab

    with Lab("ht", prefix="sgo-") as lab:
        with Kamailio(lab.hub, lab.proxy_ip, logmode="stderr") as k:
            client = lab.add_client(CLIENT)
            yield lab, k, client




def test_bans_mirrored_into_real_kamailio(kamailio, tmp_path):
    from tests.lab.sip import SipClient

    lab, k, client = kamailio
    rpc_url = f"unix:{k.work / 'run' / 'kamailio_rpc.sock'}"
    rpc = JsonRpc(rpc_url)
    table = lambda: dump_keys(rpc.call("htable.dump", "ipban"))  # noqa: E731
    # before sipguard starts: a stale sipguard entry (value 2) and one of the script's pike blocks (1)
    rpc.call("htable.seti", "ipban", "198.51.100.66", 2)
    rpc.call("htable.seti", "ipban", "198.51.100.77", 1)
    state = tmp_path / "st"
    store = Store.open_state_dir(state)
    store.put_ban(Ban("198.51.100.5", "manual", time.time(), time.time() + 600, manual=True))
    log = tmp_path / "k.log"
    log.touch()
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "daemon": {"control_interval": 0.05},
                                 "htable": {"enabled": True, "rpc": rpc_url}})
    kernel = DryRunEnforcer()
    d = build_daemon(cfg, store, kernel, logs=[str(log)])
    th = threading.Thread(target=d.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: d.ready.is_set(), timeout=8.0)
        # the full resync at start: store's ban in, stale sipguard entry out, pike's entry kept
        assert table() == {"198.51.100.5": 2, "198.51.100.77": 1}
        with SipClient(server=lab.proxy_ip, netns=client.name, local_ip=CLIENT, timeout=1.0) as sip:
            r = sip.options()
            assert r is not None and r.status == 200  # not banned yet: Kamailio answers
            ts = datetime.now().strftime("%b %d %H:%M:%S")
            with log.open("a") as f:
                f.write(f"{ts} edge kamailio[42]: WARNING: <script>: Blocked scanner UA 'sipvicious' "
                        f"from {CLIENT}:5060\n")
            wait_for(lambda: CLIENT in table(), timeout=8.0)
            item = rpc.call("htable.get", "ipban", CLIENT)["item"]
            assert item["value"] == 2 and item["expire"] != "NEVER"  # timed ban: per-item expiry
            assert CLIENT in {e.ip for e in kernel.entries()}  # the kernel enforcer got it too
            sip.drain()
            assert sip.options() is None  # $sht(ipban=>$si) != $null: Kamailio drops it silently
            manual_unban(Store.open_state_dir(state), CLIENT)
            wait_for(lambda: CLIENT not in table(), timeout=8.0)
            sip.drain()
            r = sip.options()
            assert r is not None and r.status == 200
    finally:
        d.stop()
        th.join(10)
        store.close()
    assert not th.is_alive()
