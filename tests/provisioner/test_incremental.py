"""The incremental reader gives the snapshot a full read gives, change after change."""

from __future__ import annotations

import random
from pathlib import Path

from tinkops.home import init_home
from tinkops.incremental import IncrementalReader
from tinkops.repository import Snapshot, SnapshotReader
from tinkops_agent.gitrepo import GitRepo, Identity

OPERATOR = Identity("op", "op@example.test")


def hardware(number: int, mac_number: int | None = None) -> bytes:
    mac = f"02:00:00:00:00:{(mac_number or number) % 256:02x}"
    return f"id: hw-{number}\nnetwork:\n  interfaces:\n    - dhcp:\n        mac: {mac}\n".encode()


def request(template: str, number: int) -> bytes:
    mac = f"02:00:00:00:00:{number % 256:02x}"
    return f"template: {template}\nhardware_map:\n  device_1: {mac}\n".encode()


TEMPLATE = b'name: t\ntasks:\n  - name: a\n    worker: "{{ device_1 }}"\n    actions: []\n'


def commit(
    repo: GitRepo, changes: dict[str, bytes | None], links: dict[str, str], scratch: Path
) -> str:
    base = repo.rev_parse("refs/heads/main") or ""
    env = {"GIT_INDEX_FILE": str(scratch / "index")}
    repo.run("read-tree", base, env=env)
    for path, content in changes.items():
        if content is None:
            removal = f"0 {'0' * 40}\t{path}\n".encode()
            repo.run("update-index", "--index-info", input=removal, env=env)
        else:
            blob = repo.write_blob(content)
            repo.run("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
    for path, target in links.items():
        blob = repo.write_blob(target.encode())
        repo.run("update-index", "--add", "--cacheinfo", f"120000,{blob},{path}", env=env)
    tree = repo.text("write-tree", env=env).strip()
    new = repo.commit_tree(tree, [base], "Change\n", OPERATOR)
    assert repo.update_ref("refs/heads/main", new, base)
    return new


def same(incremental: Snapshot, full: Snapshot) -> None:
    assert incremental.commit == full.commit
    assert incremental.blobs == full.blobs
    assert incremental.hardware == full.hardware
    assert incremental.templates == full.templates
    assert incremental.requests == full.requests
    assert {k: v.name for k, v in incremental.workers.items()} == {
        k: v.name for k, v in full.workers.items()
    }
    assert sorted(map(str, incremental.problems)) == sorted(map(str, full.problems))


def test_matches_full_read_after_random_changes(tmp_path: Path) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    reader = IncrementalReader(repo)
    chance = random.Random(7)
    reader.read(repo.rev_parse("refs/heads/main") or "")

    for step in range(60):
        changes: dict[str, bytes | None] = {}
        links: dict[str, str] = {}
        for _ in range(chance.randint(1, 6)):
            number = chance.randint(1, 12)
            kind = chance.choice(
                ["hw", "hw-dup", "tpl", "req", "bad", "del", "yml", "sub", "link", "json"]
            )
            if kind == "hw":
                changes[f"hardware/h{number}.yaml"] = hardware(number)
            elif kind == "hw-dup":
                changes[f"hardware/h{number}.yaml"] = hardware(number, chance.randint(1, 12))
            elif kind == "tpl":
                changes[f"templates/t{number % 3}.yaml"] = TEMPLATE.replace(
                    b"name: t", f"name: t{number}".encode()
                )
            elif kind == "req":
                changes[f"workflows/r{number}.yaml"] = request(f"t{number % 3}", number)
            elif kind == "bad":
                changes[f"workflows/r{number}.yaml"] = b"template: [unclosed\n"
            elif kind == "yml":
                changes[f"hardware/h{number}.yml"] = hardware(number + 50)
            elif kind == "sub":
                changes[f"workflows/sub/r{number}.yaml"] = request("t0", number)
            elif kind == "link":
                links[f"templates/l{number}.yaml"] = "t0.yaml"
            elif kind == "json":
                changes[f"hardware/h{number}.json"] = b'{"id": "j"}'
            else:
                existing = repo.text("ls-tree", "-r", "--name-only", "main").split()
                candidates = [p for p in existing if p.count("/") >= 1]
                if candidates:
                    changes[chance.choice(candidates)] = None
        for path in list(changes):
            if path in links:
                del changes[path]
        tip = commit(repo, changes, links, tmp_path)

        same(reader.read(tip), SnapshotReader(repo).read(tip))
        assert reader.full_reads == 1, f"step {step} fell back to a full read"


def test_rewritten_history_still_matches(tmp_path: Path) -> None:
    init_home(tmp_path / "home", include_requests=False, port=0)
    repo = GitRepo(tmp_path / "home" / "repository.git")
    reader = IncrementalReader(repo)
    first = commit(repo, {"workflows/a.yaml": request("hello-world", 1)}, {}, tmp_path)
    reader.read(first)
    second = commit(repo, {"workflows/b.yaml": request("hello-world", 2)}, {}, tmp_path)
    reader.read(second)

    # Force main back to an unrelated commit, as a force push would.
    base = repo.rev_parse(f"{first}^") or ""
    repo.run("update-ref", "refs/heads/main", base)
    rewritten = commit(repo, {"workflows/c.yaml": request("hello-world", 3)}, {}, tmp_path)

    same(reader.read(rewritten), SnapshotReader(repo).read(rewritten))
    assert set(reader.read(rewritten).requests) == {"c"}
