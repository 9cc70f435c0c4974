"""`sipguard test-filter`: `--corpus FILE` (exit status, failing cases by file:line, coverage, --json, an
operator's own filter directory), the LOG / --corpus choice, and attacker text printed escaped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sipguard.filters import shipped_dir

CORPUS = Path(__file__).parent / "corpus"
BOOM = """name = "boom"
description = "an operator's own filter"
kind = "auth_failure"
prefilter = ["boom"]
regex = ['<script>: boom from (?P<ip><ADDR>):<PORT>$', '<script>: kaboom at (?P<ip><ADDR>)$']
ignore = ['from 198\\.18\\.7\\.']
"""
HEAD = "2026-11-30T02:08:09.376964+00:00 sip1 kamailio[23875]: ERROR: <script>: "
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # everything but the newline that ends a line


def sipguard(*args: str, config: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SIPGUARD_CONFIG"}
    pre = ["--config", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "sipguard", *pre, *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=cwd)


@pytest.fixture
def shipped_only(tmp_path: Path) -> Path:
    cfg = tmp_path / "sipguard.toml"
    cfg.write_text(f'[filters]\ndirectories = ["{shipped_dir()}"]\n')
    return cfg


@pytest.fixture
def operator(tmp_path: Path) -> tuple[Path, Path]:
    """An operator's config whose [filters] directories add a filter of their own beside the shipped ones."""
    d = tmp_path / "filters.d"
    d.mkdir()
    (d / "boom.toml").write_text(BOOM)
    cfg = tmp_path / "sipguard.toml"
    cfg.write_text(f'[filters]\ndirectories = ["{shipped_dir()}", "{d}"]\n')
    return cfg, d


@pytest.mark.parametrize("name", sorted(p.stem for p in CORPUS.glob("*.txt")))
def test_a_shipped_corpus_passes(name: str, shipped_only: Path) -> None:
    path = CORPUS / f"{name}.txt"
    p = sipguard("test-filter", "--corpus", str(path), config=shipped_only)
    assert p.returncode == 0, p.stdout + p.stderr
    n = sum(1 for ln in path.read_text().split("\n") if ln[:2] in ("+ ", "= ", "- ", "~ "))
    assert p.stdout.splitlines()[-1].startswith(f"{path}: {n} cases, {n} passed, 0 failed; ")
    assert "expected" not in p.stdout and "<- no case" not in p.stdout
    assert re.search(rf"^  {re.escape(name)} +regex\[0\] +[1-9]\d* ", p.stdout, re.M), p.stdout


def test_a_wrong_expectation_exits_1_and_names_file_and_line(tmp_path: Path, shipped_only: Path) -> None:
    lines = (CORPUS / "scanner-ua.txt").read_text().split("\n")
    n = next(i for i, ln in enumerate(lines, 1) if ln.startswith("+ 198.18.0.5 @"))
    lines[n - 1] = lines[n - 1].replace("+ 198.18.0.5 @", "+ 198.18.0.77 @", 1)
    m = next(i for i, ln in enumerate(lines, 1) if i > n and ln.startswith("+ 198.18.0.5 @2026-11-30T02:08:09"))
    lines[m - 1] = lines[m - 1].replace("@2026-11-30T02:08:09", "@2026-11-30T02:08:19", 1)
    path = tmp_path / "scanner-ua.txt"
    path.write_text("\n".join(lines))
    p = sipguard("test-filter", "--corpus", str(path), config=shipped_only)
    assert p.returncode == 1, p.stdout + p.stderr
    failing = [ln for ln in p.stdout.splitlines() if ": expected " in ln]
    assert len(failing) == 2, p.stdout
    assert failing[0].startswith(f"{path}:{n}: expected scanner-ua 198.18.0.77 at ")
    assert "; got scanner-ua 198.18.0.5 at " in failing[0] and "(wrong events)" in failing[0]
    assert failing[1].startswith(f"{path}:{m}: expected scanner-ua 198.18.0.5 at 2026-11-30T02:08:19")
    assert "(wrong time)" in failing[1]
    assert re.search(r", 2 failed; 1 of 1 regex/ignore entries hit by a case$", p.stdout.splitlines()[-1])

    p = sipguard("test-filter", "--corpus", str(path), "--json", config=shipped_only)
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert (doc["ok"], doc["failed"], doc["passed"] + doc["failed"]) == (False, 2, doc["cases"])
    assert [f["where"] for f in doc["failures"]] == [f"{path}:{n}", f"{path}:{m}"]
    assert doc["failures"][0]["expected"].startswith("scanner-ua 198.18.0.77")
    (cov,) = doc["coverage"]
    assert (cov["filter"], cov["what"], cov["index"]) == ("scanner-ua", "regex", 0) and cov["hits"] > 10


def test_an_operator_filter_directory_with_its_own_filter_and_corpus(operator: tuple[Path, Path]) -> None:
    cfg, d = operator
    corpus = d / "boom.txt"
    corpus.write_text(
        "# my filter's corpus\n"
        f"+ 198.18.0.5 @2026-11-30T02:08:09.376964+00:00 | {HEAD}boom from 198.18.0.5:5060\n"
        f"+ 2001:db8::5 @2026-11-30T01:55:12 | Nov 30 01:55:12 sip1 kamailio[23875]: ERROR: <script>: "
        "kaboom at [2001:db8::5]\n"
        f"- | {HEAD}boom from 198.18.7.1:5060\n"                 # the ignore entry
        f"~ | {HEAD}boom from 198.18.0.5\n"
        f"= scanner-ua 198.18.0.6 | {HEAD}Blocked scanner UA 'boom from 198.18.0.99:5060' from 198.18.0.6:5060\n")
    p = sipguard("test-filter", "--corpus", str(corpus), config=cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout.splitlines()
    assert out[-1] == f"{corpus}: 5 cases, 5 passed, 0 failed; 3 of 3 regex/ignore entries hit by a case"
    rows = [ln.split(None, 3) for ln in out if ln.startswith("  boom ")]
    assert [r[1:3] for r in rows] == [["regex[0]", "1"], ["regex[1]", "1"], ["ignore[0]", "1"]]
    assert rows[1][3] == "<script>: kaboom at (?P<ip><ADDR>)$"  # as written in the file, macros kept

    # a regex no case hits is marked; the exit status stays about the cases
    corpus.write_text(f"+ 198.18.0.5 | {HEAD}boom from 198.18.0.5:5060\n")
    p = sipguard("test-filter", "--corpus", str(corpus), config=cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [ln for ln in p.stdout.splitlines() if "<- no case" in ln] == [
        "  boom    regex[1]       0  <script>: kaboom at (?P<ip><ADDR>)$   <- no case",
        "  boom    ignore[0]      0  from 198\\.18\\.7\\.   <- no case"]

    # another file name: --filter names the filter its '+' lines are about
    other = d / "tests.txt"
    other.write_text(f"+ 198.18.0.5 | {HEAD}boom from 198.18.0.5:5060\n")
    p = sipguard("test-filter", "--corpus", str(other), config=cfg)
    assert p.returncode == 1 and "'tests' (the file's name; name another with --filter)" in p.stderr, p.stderr
    p = sipguard("test-filter", "--corpus", str(other), "--filter", "boom", config=cfg)
    assert p.returncode == 0, p.stdout + p.stderr


def test_attacker_text_is_printed_escaped(tmp_path: Path, operator: tuple[Path, Path]) -> None:
    cfg, d = operator
    evil = "boom \x1b]0;owned\x07\x1b[2J\r\x7f\x9b31m\tfrom 198.18.0.5:5060"
    corpus = d / "boom.txt"
    corpus.write_text(f"+ 198.18.0.5 | {HEAD}{evil}\n+ 198.18.0.5\x1b[1m | {HEAD}boom from 198.18.0.5:5060\n")
    p = sipguard("test-filter", "--corpus", str(corpus), config=cfg)
    assert p.returncode == 1
    assert not CONTROL.search(p.stdout), repr(p.stdout)
    assert "boom \\x1b]0;owned\\x07\\x1b[2J\\x0d\\x7f\\x9b31m\\x09from 198.18.0.5:5060" in p.stdout
    assert f"{corpus}:2: expected boom 198.18.0.5\\x1b[1m; got boom 198.18.0.5" in p.stdout
    p = sipguard("test-filter", "--corpus", str(corpus), "--json", config=cfg)
    assert not CONTROL.search(p.stdout) and json.loads(p.stdout)["failures"][0]["text"] == [HEAD + evil]

    # the LOG report's samples and missed lines too
    log = tmp_path / "kamailio.log"
    log.write_text(f"{HEAD}boom \x1b[2Jx from 198.18.0.5:5060\n{HEAD}nothing \x1b[2J here\n")
    p = sipguard("test-filter", str(log), "--show-missed", config=cfg)
    assert p.returncode == 0, p.stderr
    assert not CONTROL.search(p.stdout), repr(p.stdout)
    assert "boom \\x1b[2Jx from 198.18.0.5:5060" in p.stdout and "nothing \\x1b[2J here" in p.stdout


@pytest.mark.parametrize("args, needle", [
    ([], "needs a LOG file or --corpus FILE"),
    (["LOG", "--corpus", "CORPUS"], "a LOG file or --corpus FILE, not both"),
    (["--corpus", "CORPUS", "--show-missed"], "--show-missed is for a LOG file"),
    (["LOG", "--json"], "--json goes with --corpus"),
    (["--corpus", "MISSING"], "no such file"),
    (["--corpus", "BAD"], "bad.txt:2: expected '+ IP [@TIME] | LINE'"),
    (["--corpus", "EMPTY"], "no cases"),
])
def test_usage_errors_are_one_line(tmp_path: Path, shipped_only: Path, args: list[str], needle: str) -> None:
    log = tmp_path / "k.log"
    log.write_text("")
    (tmp_path / "scanner-ua.txt").write_text("- | x\n")
    (tmp_path / "bad.txt").write_text("# x\n+ | y\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    names = {"LOG": log, "CORPUS": tmp_path / "scanner-ua.txt", "MISSING": tmp_path / "missing.txt",
             "BAD": tmp_path / "bad.txt", "EMPTY": tmp_path / "empty.txt"}
    p = sipguard("test-filter", *[str(names.get(a, a)) for a in args], config=shipped_only)
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sipguard: error:") and needle in lines[0], p.stderr
