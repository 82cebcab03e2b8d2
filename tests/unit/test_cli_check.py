"""`python -m resolver check DIR` as an administrator runs it: exit status, one `path:line: message`
line per problem on stdout, a summary on stderr; the shipped blocklists/ pass."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_loader import BROKEN, break_dir, make_dir

ROOT = Path(__file__).resolve().parents[2]


def check(directory, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "resolver", "check", str(directory), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_shipped_blocklists_pass():
    result = check("blocklists")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert re.search(r"blocklists: ok, revision [0-9a-f]{12}: \d+ groups, \d+ services", result.stderr)


def test_a_good_directory_passes(tmp_path):
    result = check(make_dir(tmp_path))
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


# the CLI runs each broken directory in a subprocess: keep a representative subset per kind
CLI_CASES = [b for b in BROKEN if b[0] in {
    "bad-yaml", "bad-yaml-service", "bad-cidr-prefix", "cidr-host-bits", "unknown-service",
    "duplicate-subnet", "bad-regex", "regex-matches-everything", "unknown-key-policy",
    "unknown-key-group", "unknown-key-service", "invalid-name-case"}]


@pytest.mark.parametrize("case,file,old,new,line,words", CLI_CASES, ids=[b[0] for b in CLI_CASES])
def test_broken_directory(tmp_path, case, file, old, new, line, words):
    root = break_dir(tmp_path / "bl", file, old, new)
    result = check(root)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    m = re.fullmatch(r"(.+):(\d+): (.+)", lines[0])
    assert m, lines[0]
    assert m.group(1) == str(root / file) and int(m.group(2)) == line, lines[0]
    for word in words:
        assert word in m.group(3)
    assert result.stderr.strip() == f"{root}: 1 error(s)"


def test_paths_are_relative_to_where_check_runs(tmp_path):
    break_dir(tmp_path / "bl", "policy.yaml", "block: [chat]", "block: [chats]")
    result = check("bl", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith("bl/policy.yaml:4: group 'desktop': unknown service 'chats'")


def test_every_problem_is_listed(tmp_path):
    root = make_dir(tmp_path / "bl")
    (root / "policy.yaml").write_text((root / "policy.yaml").read_text()
                                      .replace("10.1.0.0/16", "10.1.0.0/33")
                                      .replace("block: [chat]", "block: [chats]")
                                      .replace("default_group: mobile\n", "default_group: mobile\ncolour: red\n"))
    (root / "services" / "bad.yaml").write_text("description: x\npatterns:\n  - {pattern: '.*', source: t}\n"
                                                "sources: {t: test}\n")
    result = check(root)
    assert result.returncode == 1
    found = sorted((Path(p).name, int(n)) for p, n in re.findall(r"^(.+?):(\d+): ", result.stdout, re.M))
    assert found == [("bad.yaml", 3), ("policy.yaml", 3), ("policy.yaml", 4), ("policy.yaml", 10)], result.stdout
    assert result.stderr.strip().endswith("4 error(s)")


def test_warnings_pass_unless_strict(tmp_path):
    root = make_dir(tmp_path / "bl", chat=CHAT_NO_SOURCE)
    relaxed, strict = check(root), check(root, "--strict")
    assert relaxed.returncode == 0 and "warning: domains entry 'chat.test' has no source" in relaxed.stdout
    assert strict.returncode == 1 and "has no source" in strict.stdout and "warning:" not in strict.stdout


CHAT_NO_SOURCE = "description: chat\nsources: {t: test}\ndomains:\n  - chat.test\n"
