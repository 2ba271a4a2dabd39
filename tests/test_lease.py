"""Concurrent writers: one lease per output prefix (hetcomp_dist.lease), on local disk and on the moto S3 server.

Two writers on one prefix: exactly one gets the lease, the other a one-line LeaseHeld naming the owner
and the expiry; an expired lease (or one whose owner died on this host) is taken over; a lease lost
before the commit prevents the commit; a writer's cleanup never deletes another writer's parts.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hetcomp_dist import lease, storage
from hetcomp_dist.cli import main
from hetcomp_dist.lease import LeaseHeld, LeaseLost
from hetcomp_dist.storage import StorageError

REPO = Path(__file__).resolve().parents[1]
CSV = "user,item\n" + "".join(f"{u},{(u * 7 + i) % 40}\n" for u in range(30) for i in range(12))


def _no_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases held in this test are not renewed (so that they expire)."""
    monkeypatch.setattr(lease._Renewer, "run", lambda self: None)


def test_exactly_one_of_two_concurrent_writers_gets_the_lease(storage_root: str) -> None:
    prefix = storage.join(storage_root, "out")
    barrier, results = threading.Barrier(2), {}

    def writer(name: str) -> None:
        barrier.wait()
        try:
            results[name] = lease.acquire(prefix, owner=name)
        except LeaseHeld as e:
            results[name] = e

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results.values() if isinstance(r, lease.Lease)]
    lost = [r for r in results.values() if isinstance(r, LeaseHeld)]
    assert len(won) == 1 and len(lost) == 1, results
    message = str(lost[0])
    assert "\n" not in message and f"owner {won[0].owner!r}" in message and "s from now" in message, message
    assert message.startswith(f"{prefix}: another writer holds it")
    won[0].check()
    won[0].release()
    assert not storage.exists(lease.lease_uri(prefix))


def test_the_lease_is_beside_the_prefix_not_inside(storage_root: str) -> None:
    prefix = storage.join(storage_root, "out")
    with lease.hold(prefix) as held:
        assert held.uri == prefix + ".lease"
        with storage.open_output(prefix, "k") as out:
            out.write_bytes("a.bin", b"a")
        storage.remove(prefix)                      # a writer's cleanup of its prefix
        assert storage.exists(held.uri)
        held.check()
        record = json.loads(storage.filesystem(held.uri)[0].cat_file(storage.filesystem(held.uri)[1]))
        assert {"owner", "token", "expires", "expires_at"} <= set(record) and record["token"] == held.token
    assert not storage.exists(prefix + ".lease")


def test_an_expired_lease_is_taken_over(storage_root: str) -> None:
    prefix = storage.join(storage_root, "out")
    old = lease.acquire(prefix, owner="old", ttl_s=0.3)
    with pytest.raises(LeaseHeld, match="owner 'old'"):
        lease.acquire(prefix, owner="new")
    time.sleep(0.4)
    new = lease.acquire(prefix, owner="new")
    with pytest.raises(LeaseLost, match=r"was taken over \(owner 'new'"):
        old.check()
    with pytest.raises(LeaseLost):
        old.renew()
    old.release()                                   # not ours any more: left in place
    new.check()
    new.release()
    assert not storage.exists(new.uri)


def test_concurrent_renewals_in_one_process_do_not_lose_the_lease(storage_root: str) -> None:
    """A step renewing while lease.hold's thread renews: both must succeed (they once shared a temp file)."""
    held = lease.acquire(storage.join(storage_root, "out"), owner="me")
    errors: list[BaseException] = []

    def renew_many() -> None:
        try:
            for _ in range(15):
                held.renew()
        except BaseException as e:                 # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=renew_many) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    held.check()
    held.release()


def test_the_holder_renews_its_lease(storage_root: str) -> None:
    prefix = storage.join(storage_root, "out")
    with lease.hold(prefix, ttl_s=0.6) as held:
        time.sleep(1.0)                             # longer than the TTL: renewed meanwhile
        held.check()
        with pytest.raises(LeaseHeld):
            lease.acquire(prefix)


_DIES_HOLDING = """
import os, sys
from hetcomp_dist import lease
lease.acquire(sys.argv[1], owner="doomed")
os._exit(9)
"""


def test_a_lease_whose_owner_died_on_this_host_is_taken_over_at_once(storage_root: str) -> None:
    prefix = storage.join(storage_root, "out")
    done = subprocess.run([sys.executable, "-c", _DIES_HOLDING, prefix], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 9, done.stderr
    assert storage.exists(lease.lease_uri(prefix))
    held = lease.acquire(prefix)                    # not 15 minutes later
    held.release()


def test_a_lost_lease_prevents_the_commit_and_its_cleanup_spares_the_new_writer(
        storage_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_renewal(monkeypatch)
    prefix = storage.join(storage_root, "out")
    with contextlib.ExitStack() as new_writer:
        with pytest.raises(LeaseLost, match="nothing committed"):
            with lease.hold(prefix, owner="stalled", ttl_s=0.3):
                with storage.open_output(prefix, "k", {"by": "stalled"}) as out:
                    out.write_bytes("a.bin", b"stalled")
                    time.sleep(0.4)                 # stalled past its TTL: another writer takes over
                    taker = lease.acquire(prefix, owner="taker")
                    new_writer.callback(taker.release)
                    other = new_writer.enter_context(storage.open_output(prefix, "k", {"by": "taker"}))
                    other.write_bytes("a.bin", b"taker")
        assert not storage.is_complete(prefix)
        assert storage.exists(lease.lease_uri(prefix))          # the taker's, not removed by the loser
        taker.check()
    assert storage.read_manifest(prefix)["config"] == {"by": "taker"}
    assert storage.read_bytes(prefix, "a.bin") == b"taker"
    assert not storage.exists(lease.lease_uri(prefix))


def test_a_failed_writers_cleanup_never_deletes_another_writers_part(storage_root: str) -> None:
    """Two writers on one prefix without a lease (the old race of two `hetcomp prepare`): the one that
    fails removes only its own temporaries, so the other's committed part is intact."""
    uri = storage.join(storage_root, "out")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_output(uri, "k", {"by": "loser"}) as loser:
            with storage.open_output(uri, "k", {"by": "winner"}) as winner:
                winner.write_bytes("train.bin", b"winner's part")
                loser.write_bytes("train.bin", b"loser's half part")
            raise RuntimeError("boom")
    assert storage.read_manifest(uri)["config"] == {"by": "winner"}
    assert storage.read_bytes(uri, "train.bin") == b"winner's part"
    fs, path = storage.filesystem(uri)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(path)) == ["MANIFEST.json", "train.bin"]


def test_commit_scope_checks_and_stamps_manifests_under_its_prefix(storage_root: str) -> None:
    prefix, elsewhere = storage.join(storage_root, "out"), storage.join(storage_root, "outside")
    calls = []
    with storage.commit_scope(prefix, check=lambda: calls.append(1), fields={"stamp": "x"}):
        with storage.open_output(storage.join(prefix, "checkpoints", "epoch-1"), "k") as out:
            out.write_bytes("s.pt", b"s")
        storage.commit_manifest(elsewhere, "k", {})
    assert calls and storage.read_manifest(storage.join(prefix, "checkpoints", "epoch-1"))["stamp"] == "x"
    assert "stamp" not in storage.read_manifest(elsewhere)

    def refuse() -> None:
        raise LeaseLost("refused")

    with storage.commit_scope(prefix, check=refuse):
        with pytest.raises(LeaseLost):
            with storage.open_output(prefix, "k") as out:
                out.write_bytes("a.bin", b"a")
    assert not storage.is_complete(prefix) and not storage.exists(storage.join(prefix, "a.bin"))


def test_prepare_refuses_a_prefix_another_writer_holds(storage_root: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "in.csv"
    source.write_text(CSV)
    out = storage.join(storage_root, "dataset")
    with lease.hold(out, owner="the other writer"):
        assert main(["prepare", str(source), "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hetcomp prepare: error: {out}: another writer holds it (owner 'the other writer', "), err
    assert err.count("\n") == 1
    assert not storage.exists(out) and not storage.exists(lease.lease_uri(out))
    assert main(["prepare", str(source), "--out", out, "--quiet"]) == 0   # once released
    assert not storage.exists(lease.lease_uri(out))


_KILLED_REWRITE = """
import os, sys
from hetcomp_dist import storage
from hetcomp_dist.data import prepare

original = prepare.write_split                      # how prepare writes each split
def write_split(output, name, *args, **kwargs):
    original(output, name, *args, **kwargs)
    if name == "valid.parquet":
        os._exit(9)                                  # as kill -9 would, mid-rewrite
prepare.write_split = write_split
prepare.prepare(sys.argv[1], sys.argv[2], seed=1, progress=False)
"""


def test_a_killed_rewrite_leaves_nothing_of_the_old_dataset_to_trust(storage_root: str, tmp_path: Path) -> None:
    """The old meta.json must not outlive a rewrite killed before its commit (next to new parts, no manifest)."""
    source = tmp_path / "in.csv"
    source.write_text(CSV)
    out = storage.join(storage_root, "dataset")
    assert main(["prepare", str(source), "--out", out, "--quiet"]) == 0
    old = storage.read_manifest(out)
    assert old["meta"] == storage.read_json(out, "meta.json")   # what a reader trusts is in the manifest
    killed = subprocess.run([sys.executable, "-c", _KILLED_REWRITE, str(source), out], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    assert not storage.is_complete(out)
    for name in ("meta.json", "train.parquet", "valid.parquet", "test.parquet", "user_map.parquet"):
        assert not storage.exists(storage.join(out, name)), name
    with pytest.raises(StorageError, match="no MANIFEST.json"):
        storage.read_json(out, "meta.json")
    # The rerun takes over the dead writer's lease at once and sweeps its temporaries.
    assert main(["prepare", str(source), "--out", out, "--quiet", "--seed", "1"]) == 0
    fs, path = storage.filesystem(out)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))
    assert names == sorted(["MANIFEST.json", *storage.read_manifest(out)["parts"]]), names
    assert storage.read_manifest(out)["meta"]["seed"] == 1


def test_a_held_lease_is_waited_for_up_to_the_setting(storage_root: str, monkeypatch, capsys) -> None:
    """A retried job (its dead driver's lease not yet expired) waits for it, then takes it over."""
    prefix = storage.join(storage_root, "out")
    old = lease.acquire(prefix, owner="dead driver", ttl_s=1.0)     # not renewed: expires in 1 s
    with pytest.raises(LeaseHeld, match="owner 'dead driver'"):
        with lease.hold(prefix, owner="retry", wait_s=0.3):
            pass
    assert "waiting up to 0.3 s" in capsys.readouterr().err
    monkeypatch.setenv(lease.WAIT_ENV, "10")
    start = time.monotonic()
    with lease.hold(prefix, owner="retry") as held:
        assert 0.5 < time.monotonic() - start < 8
        held.check()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "owner 'dead driver'" in err[0] and f"waiting up to 10 s ({lease.WAIT_ENV})" in err[0]
    with pytest.raises(LeaseLost):
        old.check()


@pytest.mark.parametrize("value", ["soon", "-5", "nan"])
def test_a_bad_wait_setting_is_one_line_naming_it(monkeypatch, value) -> None:
    monkeypatch.setenv(lease.WAIT_ENV, value)
    with pytest.raises(StorageError, match=f"{lease.WAIT_ENV}='{value}': must be a number of seconds >= 0"):
        lease.wait_setting()
