"""`hetcomp ensemble`: each teacher's final snapshot alone and the ensemble, on a tiny synthetic run."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hetcomp_dist import cli, storage
from hetcomp_dist.config import ConfigError, from_dict
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.data.prepare import prepare
from hetcomp_dist.distill import ensemble_eval
from hetcomp_dist.run import RunConfig
from hetcomp_dist.storage import StorageError
from hetcomp_dist.run import RunLayout
from hetcomp_dist.teachers.trajectory import TrajectoryWriter

N_USERS, N_ITEMS, K = 40, 120, 50
TEACHERS = ("oracle", "noise", "valid_first")


def _unobserved_lists(data, kind: str, seed: int) -> np.ndarray:
    """int32 [n_users, K] top-K unobserved items per user.

    oracle: the user's test items, then valid items, then random others;
    valid_first: valid items, then random others (never a test item in the list);
    noise: a random permutation of the unobserved items.
    """
    out = np.empty((data.n_users, K), dtype=np.int32)
    for u in range(data.n_users):
        rng = np.random.default_rng([seed, u])
        test, valid, train = data.test.items_of(u), data.valid.items_of(u), data.train.items_of(u)
        rest = rng.permutation(np.setdiff1d(np.arange(data.n_items), np.concatenate([train, test, valid])))
        if kind == "oracle":
            lst = np.concatenate([test, valid, rest])
        elif kind == "valid_first":
            lst = np.concatenate([valid, rest])
        else:
            lst = rng.permutation(np.setdiff1d(np.arange(data.n_items), train))
        out[u] = lst[:K]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared dataset under <run>/dataset and three teachers' trajectories (4 stages each; only the
    last, written at the best epoch, is an informative list: earlier stages are noise)."""
    root = tmp_path_factory.mktemp("ens")
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(N_USERS):
        chosen = rng.choice(N_ITEMS, size=15, replace=False)
        users += [u] * len(chosen)
        items += chosen.tolist()
    pq.write_table(pa.table({"user": users, "item": items}), root / "log.parquet")
    run_uri = str(root / "run")
    prepare(str(root / "log.parquet"), storage.join(run_uri, "dataset"), progress=False)
    data = load_dataset(storage.join(run_uri, "dataset"))
    for t, name in enumerate(TEACHERS):
        uri = RunLayout(run_uri).trajectory(name)
        writer = TrajectoryWriter(uri, model=name, n_users=data.n_users, k=K, n_items=data.n_items,
                                  row_group_users=16)
        for stage, epoch in enumerate((1, 2, 3, 4)):
            kind = name if stage == 3 else "noise"
            lists = _unobserved_lists(data, kind, seed=100 * t + stage)
            writer.write_snapshot(epoch, {"recall@20": 0.1 * (stage + 1)}, [(np.arange(data.n_users), lists)])
        observed = data.train.padded(np.arange(data.n_users), width=15).astype(np.int32)
        writer.finish([(np.arange(data.n_users), observed)])
    return run_uri, data


def _cfg(run_uri: str, **distill) -> RunConfig:
    return from_dict(RunConfig, {"run": run_uri, "data": {"source": "unused"}, "ks": [10, 20],
                                 "eval_batch_size": 7, "teachers": [{"name": n, "model": "bpr_mf"} for n in TEACHERS],
                                 "distill": {"select_metric": "recall@20", **distill}})


def _reference_recall(data, lists: np.ndarray, temperature: float, k: int, split: str = "test") -> float:
    """Mean recall@k of the ensemble of lists [U, T, K], written out per user in float64."""
    truth, other = (data.test, data.valid) if split == "test" else (data.valid, data.test)
    values = []
    for u in data.eval_users():
        score = np.zeros(data.n_items)
        for t in range(lists.shape[1]):
            for r, i in enumerate(lists[u, t]):
                score[i] += math.exp(-r / temperature)
        score[score == 0] = -np.inf                  # items in no list are not ranked
        score[data.train.items_of(u)] = -np.inf
        score[other.items_of(u)] = -np.inf
        top = np.argsort(-score, kind="stable")[:k]
        top = top[np.isfinite(score[top])]
        gt = truth.items_of(u)
        values.append(np.isin(top, gt).sum() / len(gt))
    return float(np.mean(values))


def test_teacher_rows_are_their_final_lists(run):
    run_uri, data = run
    res = ensemble_eval.evaluate_ensemble(_cfg(run_uri))
    assert list(res["models"]) == [*TEACHERS, "ensemble"]
    assert res["ks"] == [10, 20, 50] and res["n_users"] == len(data.eval_users()) > 0
    oracle = res["models"]["oracle"]
    for split in ("test", "valid"):      # its final lists lead with the held-out items of both splits
        for k in (10, 20, 50):
            assert oracle[split][f"recall@{k}"] == pytest.approx(1.0)
            assert oracle[split][f"ndcg@{k}"] == pytest.approx(1.0)
    vf = res["models"]["valid_first"]
    assert vf["test"]["recall@50"] == 0.0 and vf["valid"]["recall@10"] == pytest.approx(1.0)
    for m in res["models"].values():
        assert {"popularity_lift@50", "arp@50", "coverage@50"} <= set(m["test"])
        assert 0 < m["test"]["coverage@50"] <= 1
    assert [t["final_epoch"] for t in res["teachers"]] == [4, 4, 4]


def test_ensemble_matches_a_direct_computation(run):
    run_uri, data = run
    lists = np.stack([_unobserved_lists(data, n, seed=100 * t + 3) for t, n in enumerate(TEACHERS)], axis=1)
    for temperature in (10.0, 40.0):
        res = ensemble_eval.evaluate_ensemble(_cfg(run_uri), temperature=temperature)
        assert res["temperature"] == temperature
        for split in ("test", "valid"):
            assert res["models"]["ensemble"][split]["recall@20"] == pytest.approx(
                _reference_recall(data, lists, temperature, 20, split), abs=1e-9)
    # the temperature comes from distill.temperature unless overridden
    a = ensemble_eval.evaluate_ensemble(_cfg(run_uri, temperature=40.0))["models"]["ensemble"]["test"]
    b = ensemble_eval.evaluate_ensemble(_cfg(run_uri), temperature=40.0)["models"]["ensemble"]["test"]
    assert a == b


def test_blocks_do_not_change_the_metrics(run):
    run_uri, _ = run
    whole = ensemble_eval.evaluate_ensemble(_cfg(run_uri))
    blocked = ensemble_eval.evaluate_ensemble(_cfg(run_uri), block_users=9)
    for name in whole["models"]:
        for split in ("test", "valid"):
            for key, v in whole["models"][name][split].items():
                assert blocked["models"][name][split][key] == pytest.approx(v, abs=1e-12), (name, split, key)


def test_distill_teachers_selects_and_comparison(run):
    run_uri, _ = run
    res = ensemble_eval.evaluate_ensemble(_cfg(run_uri, teachers=["noise", "oracle"]))
    assert list(res["models"]) == ["noise", "oracle", "ensemble"]
    c = res["comparison"]
    assert c["best_teacher"] == "oracle" and c["metric"] == "recall@50" and c["best_value"] == pytest.approx(1.0)
    assert c["relative_gain"] == pytest.approx(c["ensemble_value"] - 1.0)
    assert "best single teacher on test recall@50: oracle (1.0000)" in ensemble_eval.format_comparison(res)


def test_cli_prints_tables_and_writes_output(run, tmp_path, capsys):
    run_uri, _ = run
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"run": run_uri, "data": {"source": "unused"}, "ks": [10, 20],
                                    "teachers": [{"name": n, "model": "bpr_mf"} for n in TEACHERS],
                                    "distill": {"select_metric": "recall@20"}}))
    assert cli.main(["ensemble", "--config", str(conf), "--temperature", "40", "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    header = "| model | recall@10 | ndcg@10 | recall@20 | ndcg@20 | popularity_lift@50 | arp@50 | coverage@50 |"
    assert rows.count(header) == 2                                      # a test and a valid table
    assert [r.split(" | ")[0] for r in rows if r != header] == ["| oracle", "| noise", "| valid_first", "| **ensemble**"] * 2
    assert rows[1].startswith("| oracle | 1.0000 | 1.0000 | 1.0000 | 1.0000 |")
    assert "best single teacher on test recall@50: oracle (1.0000)" in printed
    out = storage.join(run_uri, "ensemble")
    manifest = storage.read_manifest(out)
    assert manifest["kind"] == "ensemble-evaluation" and set(manifest["parts"]) == {"metrics.json", "report.md"}
    assert manifest["config"]["temperature"] == 40.0 and manifest["config"]["teachers"] == list(TEACHERS)
    saved = json.loads(storage.read_bytes(out, "metrics.json", manifest))
    assert saved["models"]["oracle"]["test"]["recall@50"] == pytest.approx(1.0)
    report = storage.read_bytes(out, "report.md", manifest).decode()
    assert "## Test" in report and "## Valid" in report and header in report and "exp(-r / 40)" in report


def test_missing_trajectory_is_a_one_line_error(run, tmp_path, capsys):
    run_uri, _ = run
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"run": run_uri, "data": {"source": "unused"},
                                    "teachers": [{"name": n, "model": "bpr_mf"} for n in (*TEACHERS, "ghost")]}))
    assert cli.main(["ensemble", "--config", str(conf), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    expected_uri = RunLayout(run_uri).trajectory("ghost")
    assert len(err.splitlines()) == 1
    assert err.startswith("hetcomp ensemble: error: teacher 'ghost'") and expected_uri in err
    with pytest.raises(StorageError, match="ghost"):
        ensemble_eval.evaluate_ensemble(_cfg(run_uri, teachers=["oracle", "ghost"]))


def test_bad_settings(run):
    run_uri, _ = run
    with pytest.raises(ConfigError, match="temperature"):
        ensemble_eval.evaluate_ensemble(_cfg(run_uri), temperature=0.0)
    cfg = _cfg(run_uri)
    cfg.ks = [10, 100]
    with pytest.raises(ConfigError, match="K=50"):
        ensemble_eval.evaluate_ensemble(cfg)


def test_valid_weighted_ensemble_stands_up_to_weak_teachers(tmp_path):
    """One teacher that knows each user's valid and test items, three that are noise: the equal-weight
    ensemble drowns the good one; weights chosen on valid (never test) keep the ensemble at its level."""
    run_uri = str(tmp_path / "run")
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(N_USERS), 15)
    items = np.concatenate([rng.choice(N_ITEMS, size=15, replace=False) for _ in range(N_USERS)])
    pq.write_table(pa.table({"user": users, "item": items}), tmp_path / "log.parquet")
    prepare(str(tmp_path / "log.parquet"), storage.join(run_uri, "dataset"), progress=False)
    data = load_dataset(storage.join(run_uri, "dataset"))
    names = ["good", "weak1", "weak2", "weak3"]
    for t, name in enumerate(names):
        writer = TrajectoryWriter(RunLayout(run_uri).trajectory(name), model=name, n_users=data.n_users, k=K,
                                  n_items=data.n_items)
        kind = "oracle" if name == "good" else "noise"                # the weak ones agree with each other
        writer.write_snapshot(1, {"recall@20": 0.5}, [(np.arange(data.n_users), _unobserved_lists(data, kind, min(t, 1)))])
        observed = data.train.padded(np.arange(data.n_users), width=15).astype(np.int32)
        summary = {"valid": {"recall@10": 0.9 if name == "good" else 0.05}}     # what train_teacher records
        writer.finish([(np.arange(data.n_users), observed)], extra={"summary": summary})
    cfg = from_dict(RunConfig, {"run": run_uri, "data": {"source": "unused"}, "ks": [10, 20],
                                "teachers": [{"name": n, "model": "bpr_mf"} for n in names],
                                "distill": {"select_metric": "recall@10", "teacher_weights": "valid"}})
    res = ensemble_eval.evaluate_ensemble(cfg, temperature=10.0)
    good = res["models"]["good"]["test"]["recall@10"]
    assert res["models"]["ensemble"]["test"]["recall@10"] < good - 0.1              # dragged down
    assert res["models"]["ensemble (valid-weighted)"]["test"]["recall@10"] >= good - 0.02
    record = res["teacher_weights"]
    assert record["chosen"] != "ensemble (weights p=0)" and record["weights"][0] > 3 * record["weights"][1]
    assert "valid-weighted ensemble" in ensemble_eval.format_comparison(res)
