"""corral on a real PostgreSQL server: the CLI end to end, with ``database_url`` set.

A throwaway cluster is created for this module only: its data directory and unix socket
live in a temporary directory, it listens on no TCP port, and it is stopped and removed
afterwards whatever happened. ``make setup`` installs what it needs (Debian's
``postgresql``, and psycopg through the ``postgres`` extra): a missing part fails the test.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from corral.inventory.db import HEAD
from tests.conftest import DATA, corral

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

APPLIED_COUNTS = {
    "distros": (3, 0, 0),
    "profiles": (4, 0, 0),
    "groups": (2, 0, 0),
    "nodes": (6, 0, 0),
}


def _pg_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (Debian layout)."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


@dataclass
class Server:
    bindir: Path
    sockdir: Path

    def connect(self, dbname: str = "postgres") -> Any:
        return psycopg.connect(
            host=str(self.sockdir), user="postgres", dbname=dbname, autocommit=True
        )

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@/{dbname}?host={self.sockdir}"

    def create_db(self, name: str, template: str | None = None) -> str:
        with self.connect() as conn:
            sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            conn.execute(sql)
        return name


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.fail("needs PostgreSQL server binaries in /usr/lib/postgresql/*/bin: make setup")
    # initdb and postgres refuse to run as root: run them as the postgres system user then.
    as_root = os.geteuid() == 0
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no 'postgres' user to run the server")
        prefix = ["runuser", "-u", "postgres", "--"]
    else:
        prefix = []
    # Not under pytest's tmp_path: that is private to this user, and postgres must enter it.
    top = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    data, sockdir, log = top / "data", top / "sock", top / "server.log"
    started = False

    def run(*argv: str) -> None:
        result = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            detail = log.read_text() if log.exists() else ""
            pytest.fail(f"{argv[0]} failed:\n{result.stdout}{result.stderr}{detail}")

    try:
        sockdir.mkdir()
        if as_root:
            for path in (top, sockdir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        run(
            str(bindir / "initdb"),
            "-D", str(data),
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        options = f"-k {sockdir} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        started = True  # from here on, a half-started server must be stopped too
        run(
            str(bindir / "pg_ctl"), "start",
            "-w", "-t", "30",
            "-D", str(data),
            "-l", str(log),
            "-o", options,
        )  # fmt: skip
        yield Server(bindir, sockdir)
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(top, ignore_errors=True)


def make_home(path: Path, url: str) -> Path:
    path.mkdir(parents=True)
    (path / "corral.toml").write_text(f'database_url = "{url}"\n')
    return path


def counts(stdout: str) -> dict[str, tuple[int, ...]]:
    """``nodes 6 created 0 changed 0 unchanged`` lines of ``corral apply``, by kind."""
    result = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 7 and words[2::2] == ["created", "changed", "unchanged"]:
            result[words[0]] = tuple(int(w) for w in words[1::2])
    return result


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def dump(server: Server, dbname: str) -> dict[str, list[str]]:
    """Every row of every table, to prove that a failed command changed nothing."""
    with server.connect(dbname) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' ORDER BY table_name"
            )
        ]
        # json has no equality operator, so rows are compared as text, sorted here.
        return {
            t: sorted(r[0] for r in conn.execute(f'SELECT row_to_json(t)::text FROM "{t}" t'))
            for t in tables
        }


@pytest.fixture(scope="module")
def applied(server: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with tests/data/cluster.yaml applied through the CLI; a template."""
    dbname = server.create_db("applied")
    home = make_home(tmp_path_factory.mktemp("pg-applied") / "home", server.url(dbname))
    first = ok(corral("apply", "-f", str(DATA / "cluster.yaml"), home=home))
    assert counts(first) == APPLIED_COUNTS, first
    return dbname


_numbers = itertools.count(1)


@pytest.fixture
def cluster(server: Server, applied: str) -> str:
    """A copy of the applied database for one test (so it may change it)."""
    return server.create_db(f"cluster{next(_numbers)}", template=applied)


@pytest.fixture
def cluster_home(server: Server, cluster: str, tmp_path: Path) -> Path:
    return make_home(tmp_path / "home", server.url(cluster))


def test_schema_is_migrated_by_alembic(server: Server, applied: str) -> None:
    with server.connect(applied) as conn:
        assert conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()[0]
        versions = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
        assert versions == [HEAD]
        nodes = [r[0] for r in conn.execute("SELECT name FROM node ORDER BY name")]
    assert nodes == ["bonded", "c01", "fed01", "img01", "local01", "ram01"]


def test_apply_again_changes_nothing(server: Server, cluster: str, cluster_home: Path) -> None:
    before = dump(server, cluster)
    again = ok(corral("apply", "-f", str(DATA / "cluster.yaml"), home=cluster_home))
    assert counts(again) == {kind: (0, 0, c[0]) for kind, c in APPLIED_COUNTS.items()}
    assert dump(server, cluster) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["node", "add", "x1", "--mac", "52:54:00:00:00:01"], "belongs to node c01"),
        (["node", "add", "x1", "--ip", "10.0.0.11"], "belongs to node c01"),
        (["node", "add", "c01"], "exists already"),
        (["profile", "rm", "base"], "cannot remove profile in use"),
    ],
    ids=["duplicate-mac", "duplicate-ip", "duplicate-name", "profile-in-use"],
)
def test_bad_input_exits_2_and_changes_nothing(
    server: Server, cluster: str, cluster_home: Path, argv: list[str], message: str
) -> None:
    before = dump(server, cluster)
    result = corral(*argv, home=cluster_home)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr
    assert dump(server, cluster) == before


def test_bad_cluster_file_lands_nothing(
    server: Server, cluster: str, cluster_home: Path, tmp_path: Path
) -> None:
    # The first node is valid and gets flushed before the second one fails.
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: ok1\n  - name: bad\n    profiles: [nosuch]\n")
    before = dump(server, cluster)
    result = corral("apply", "-f", str(bad), home=cluster_home)
    assert result.returncode == 2, result.stderr
    assert "unknown profile" in result.stderr.splitlines()[0]
    assert dump(server, cluster) == before


def test_export_round_trips(server: Server, cluster_home: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export.yaml"
    ok(corral("export", "-o", str(exported), home=cluster_home))
    same = ok(corral("apply", "-f", str(exported), home=cluster_home))
    assert all(c[:2] == (0, 0) for c in counts(same).values()), same
    # Into an empty PostgreSQL database: it comes back out byte for byte.
    empty = make_home(tmp_path / "empty", server.url(server.create_db("roundtrip_empty")))
    created = counts(ok(corral("apply", "-f", str(exported), home=empty)))
    assert created == APPLIED_COUNTS
    assert ok(corral("export", home=empty)) == exported.read_text()


def files(root: Path) -> dict[str, int]:
    """Relative path -> inode of every file (inodes change when a file is rewritten)."""
    return {
        str(p.relative_to(root)): p.stat().st_ino
        for p in root.rglob("*")
        if p.is_file() and p.name != ".corral-sync.lock"
    }


def test_sync_then_incremental_sync(
    server: Server, cluster: str, cluster_home: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first = ok(corral("sync", "--root", str(root), home=cluster_home))
    tree = files(root)
    assert "kickstart/c01.ks" in tree and "pxelinux.cfg/01-52-54-00-00-00-04" in tree
    assert f"sync {root} (full, 6 nodes): {len(tree)} written, 0 unchanged, 0 removed" in first
    with server.connect(cluster) as conn:
        assert conn.execute("SELECT count(*) FROM sync_file").fetchone()[0] == len(tree)

    nothing = ok(corral("sync", "--root", str(root), home=cluster_home))
    assert "(incremental, 0 nodes): 0 written" in nothing

    ok(corral("node", "set", "c01", "--var", "row=r9", home=cluster_home))
    assert "row: r9" in ok(corral("node", "show", "c01", home=cluster_home))
    again = ok(corral("sync", "--root", str(root), home=cluster_home))
    # Only c01 is rendered again; no template uses 'row', so its files stay as they are.
    assert "(incremental, 1 nodes): 0 written" in again, again
    assert files(root) == tree

    ok(corral("node", "rm", "fed01", home=cluster_home))
    removed = ok(corral("sync", "--root", str(root), home=cluster_home))
    assert "(incremental, 0 nodes): 0 written" in removed and " removed" in removed
    assert not [p for p in files(root) if "fed01" in p or "52-54-00-00-00-04" in p]
    with server.connect(cluster) as conn:
        left = conn.execute("SELECT count(*) FROM sync_file").fetchone()[0]
    assert left == len(files(root))
