"""scripts/provenance.py: records carry their commit, and go stale when the code changes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import load_script

provenance = load_script("provenance")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "surgeon").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "surgeon" / "a.py").write_text("x = 1\n")
    (tmp_path / "docs" / "page.md").write_text("page\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def _commit(root: Path, path: str, text: str) -> None:
    (root / path).write_text(text)
    _git(root, "commit", "-qam", f"change {path}")


def test_record_carries_commit_versions_command_and_policy_hashes(repo: Path) -> None:
    policy = repo / "p.yaml"
    policy.write_text("name: p\n")
    record = provenance.provenance(["scripts/x.py", "--quick"], policies=[policy], root=repo)
    assert record["commit"] == _git(repo, "rev-parse", "HEAD")
    assert record["code_commit"] == record["commit"]
    assert record["dirty"] is False
    assert record["command"] == "scripts/x.py --quick"
    assert set(record["policies"]) == {"p"} and len(record["policies"]["p"]) == 64
    assert "torch" in record["versions"] and "python" in record["versions"]


def test_record_is_current_until_the_code_changes(repo: Path) -> None:
    record = provenance.provenance("run", root=repo)
    assert provenance.staleness(record, root=repo) is None
    _commit(repo, "docs/page.md", "new page\n")  # docs only: results still hold
    assert provenance.staleness(record, root=repo) is None
    _commit(repo, "surgeon/a.py", "x = 2\n")
    reason = provenance.staleness(record, root=repo)
    assert reason is not None and "the code last changed in" in reason, reason
    assert provenance.staleness(provenance.provenance("run", root=repo), root=repo) is None


def test_uncommitted_code_changes_make_a_record_stale(repo: Path) -> None:
    (repo / "surgeon" / "a.py").write_text("x = 3\n")
    record = provenance.provenance("run", root=repo)
    assert record["dirty"] is True and record["dirty_paths"] == ["surgeon/a.py"]
    assert "uncommitted" in (provenance.staleness(record, root=repo) or "")


def test_a_record_without_a_commit_is_stale(tmp_path: Path) -> None:
    record = provenance.provenance("run", root=tmp_path)  # not a repository
    assert record["commit"] is None
    assert provenance.staleness(record, root=tmp_path) == "no commit recorded"


def test_staleness_against_a_given_commit_needs_no_git_history(tmp_path: Path) -> None:
    # the records' commits are unknown to this directory (no repository at all): the verdict
    # depends only on the record and the commit it is judged against
    record = {"commit": "a" * 40, "code_commit": "b" * 40, "dirty": False}
    assert provenance.staleness(record, current="b" * 40, root=tmp_path) is None
    reason = provenance.staleness(record, current="c" * 40, root=tmp_path)
    assert reason is not None and "cccccccccc" in reason and "bbbbbbbbbb" in reason, reason
