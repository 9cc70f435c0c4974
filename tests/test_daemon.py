"""The daemon wired end to end with the dry-run enforcer: lines in, bans out, CLI in between."""

import threading
import time
from datetime import datetime
from pathlib import Path


from sipguard.actions import manual_ban, manual_unban
from sipguard.addresses import AllowList
from sipguard.config import Config
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.store import Store
from waiting import wait_for


def syslog(text: str, pid: int = 4242) -> str:
    ts = datetime.now().strftime("%b %d %H:%M:%S")
    return f"{ts} edge kamailio[{pid}]: {text}\n"


def auth_failed(ip: str, user: str = "1000") -> str:
    return syslog(f"NOTICE: <script>: auth failed for user {user} from {ip}:5060 method REGISTER")


def success(ip: str) -> str:
    return syslog(f"NOTICE: <script>: REGISTER success for user 1000 from {ip}:5060")


def scanner(ip: str, ua: str = "friendly-scanner") -> str:
    return syslog(f"WARNING: <script>: Blocked scanner UA '{ua}' from {ip}:5060")


class Running:
    """A daemon on its own thread, over one log file, in a temp state dir."""

    def __init__(self, tmp: Path, cfg: Config | None = None) -> None:
        self.tmp = tmp
        self.log = tmp / "kamailio.log"
        self.log.touch()
        self.cfg = cfg or Config.model_validate({"allowlist": {"include_host_addresses": False},
                                                 "daemon": {"control_interval": 0.05}})
        self.enforcer = DryRunEnforcer()
        self.store = Store.open_state_dir(tmp / "state")
        self.daemon = build_daemon(self.cfg, self.store, self.enforcer, logs=[str(self.log)])
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.daemon.ready.is_set())
        return self

    def __exit__(self, *exc):
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.store.close()

    def write(self, *lines: str) -> None:
        with self.log.open("a") as f:
            f.write("".join(lines))

    def enforced(self) -> set[str]:
        return {e.ip for e in self.enforcer.entries()}




def test_detects_and_bans(tmp_path):
    with Running(tmp_path) as r:
        r.write(scanner("198.18.5.1"))
        wait_for(lambda: "198.18.5.1" in r.enforced())
        r.write(auth_failed("198.18.5.2"), auth_failed("198.18.5.2"))
        time.sleep(0.3)
        assert "198.18.5.2" not in r.enforced()
        r.write(auth_failed("198.18.5.2"))
        wait_for(lambda: "198.18.5.2" in r.enforced())
        ban = r.store.get_ban("198.18.5.2")
        assert ban.reason.startswith("auth:") and ban.score == 3 and not ban.manual
        assert 3590 < ban.expires - ban.created <= 3600


def test_success_resets_and_injection_never_bans_the_named_address(tmp_path):
    with Running(tmp_path) as r:
        ip = "198.18.5.3"
        r.write(auth_failed(ip), auth_failed(ip), success(ip), auth_failed(ip), auth_failed(ip))
        r.write(scanner("198.18.5.4", ua="x' from 198.18.0.99:5060 (IP:198.18.0.99:5060)"))
        r.write(auth_failed("198.18.5.5", user="from 198.18.0.99:5060 (IP:198.18.0.99:5060)") * 3)
        wait_for(lambda: {"198.18.5.4", "198.18.5.5"} <= r.enforced())
        time.sleep(0.3)
        assert ip not in r.enforced()
        assert "198.18.0.99" not in r.enforced()
        assert r.store.get_ban("198.18.0.99") is None


def test_cli_ban_unban_take_effect_within_a_second(tmp_path):
    with Running(tmp_path) as r:
        allow = AllowList([], include_host=False)
        cli_store = Store.open_state_dir(tmp_path / "state")  # what the CLI process opens
        manual_ban(cli_store, "198.18.5.6", 3600, "manual", allow)
        assert wait_for(lambda: "198.18.5.6" in r.enforced()) < 1.0
        # two failures, then the operator unbans: the old ones must not count any more
        r.write(auth_failed("198.18.5.7"), auth_failed("198.18.5.7"))
        time.sleep(0.3)
        manual_ban(cli_store, "198.18.5.7", 3600, "manual", allow)
        wait_for(lambda: "198.18.5.7" in r.enforced())
        manual_unban(cli_store, "198.18.5.7")
        manual_unban(cli_store, "198.18.5.6")
        assert wait_for(lambda: not ({"198.18.5.6", "198.18.5.7"} & r.enforced())) < 1.0
        r.write(auth_failed("198.18.5.7"))
        time.sleep(0.5)
        assert "198.18.5.7" not in r.enforced()  # one new failure is not three
        r.write(auth_failed("198.18.5.7"), auth_failed("198.18.5.7"))
        wait_for(lambda: "198.18.5.7" in r.enforced())  # new events do ban again
        cli_store.close()


def test_ban_expires(tmp_path):
    with Running(tmp_path) as r:
        cli_store = Store.open_state_dir(tmp_path / "state")
        manual_ban(cli_store, "198.18.5.8", 1, "short", AllowList([], include_host=False))
        wait_for(lambda: "198.18.5.8" in r.enforced())
        wait_for(lambda: "198.18.5.8" not in r.enforced(), timeout=5)
        wait_for(lambda: r.store.get_ban("198.18.5.8") is None)
        assert r.store.history(5)[0]["action"] == "expire"
        cli_store.close()


def test_restart_resumes_exactly_and_restores_bans(tmp_path):
    with Running(tmp_path) as r:
        r.write(auth_failed("198.18.5.9"), scanner("198.18.5.10"))
        wait_for(lambda: "198.18.5.10" in r.enforced())
        wait_for(lambda: r.store.count_events() == 2)
    log = tmp_path / "kamailio.log"
    with log.open("a") as f:  # written while the daemon was down
        f.write(auth_failed("198.18.5.9") + auth_failed("198.18.5.9"))
    with Running(tmp_path) as r:
        assert "198.18.5.10" in r.enforced()  # restored from the store into the enforcer
        wait_for(lambda: "198.18.5.9" in r.enforced())  # 1 before + 2 while down = 3
        time.sleep(0.3)
        assert r.store.count_events() == 4  # no line read twice


def test_garbage_does_not_kill_the_daemon(tmp_path):
    with Running(tmp_path) as r:
        with r.log.open("ab") as f:
            f.write(b"\x00\xff\xfe garbage \xc3\x28\n" + b"A" * (2 << 20) + b"\n" + b"\n\n\r\n")
            f.write(syslog("NOTICE: <script>: auth failed for user 1000 from 999.1.1.1:5060 method REGISTER").encode())
        r.write(scanner("198.18.5.11"))
        wait_for(lambda: "198.18.5.11" in r.enforced())
        assert r.thread.is_alive() and r.daemon.stats.errors == 0
