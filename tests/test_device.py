"""The device setting: resolution, the process-group backend, Ray reservations, errors before any work, and
teachers on device=cpu computing exactly what they computed before the device path existed."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from hetcomp_dist import device, distributed, models
from hetcomp_dist.cli import main
from hetcomp_dist.config import ConfigError, compatible, from_dict
from hetcomp_dist.data.dataset import Dataset, Interactions
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.ray_job import workers_device
from hetcomp_dist.distill.train import RESUMABLE_IGNORES, distill
from hetcomp_dist.run import load_run
from hetcomp_dist.evaluate import evaluate_split
from hetcomp_dist.models.vae import csr_rows
from hetcomp_dist.teachers import train as teacher_train
from hetcomp_dist.teachers.config import TeacherConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host where torch sees no GPU")


# ----------------------------------------------------------------------------- resolution and backend

@no_gpu
def test_auto_is_the_cpu_without_a_gpu_and_cpu_is_the_cpu():
    assert device.resolve("auto") == torch.device("cpu")
    assert device.resolve("cpu") == torch.device("cpu")


@no_gpu
def test_cuda_without_a_gpu_is_one_line_naming_the_setting():
    with pytest.raises(device.DeviceError) as e:
        device.resolve("cuda", "teachers[2].device")
    message = str(e.value)
    assert message.startswith("teachers[2].device: cuda, but this process sees no CUDA device")
    assert "\n" not in message
    assert isinstance(e.value, ConfigError)   # the CLI prints it as its one-line error


def test_unknown_device_name_is_refused():
    with pytest.raises(device.DeviceError, match=r"^distill.device: expected one of auto, cpu, cuda, got 'gpu'$"):
        device.resolve("gpu", "distill.device")


def test_backend_follows_the_device():
    assert device.backend(torch.device("cpu")) == "gloo"
    assert device.backend("cpu") == "gloo"
    assert device.backend(torch.device("cuda")) == "nccl"
    assert device.backend("cuda:1") == "nccl"


@pytest.mark.parametrize("name, gpus, placed", [("auto", 0, "cpu"), ("auto", 1, "cuda"), ("auto", 0.5, "cuda"),
                                                ("cpu", 0, "cpu"), ("cuda", 1, "cuda")])
def test_ray_reservation_decides_auto(name, gpus, placed):
    assert device.under_reservation(name, gpus, "x.device", "x.gpus") == placed


def test_ray_reservation_refuses_cuda_without_gpus_and_idle_gpus():
    with pytest.raises(device.DeviceError, match=r"^x.device: cuda needs x.gpus > 0 under Ray"):
        device.under_reservation("cuda", 0, "x.device", "x.gpus")
    with pytest.raises(device.DeviceError, match=r"^x.gpus: 1 GPU\(s\) reserved, but x.device is cpu"):
        device.under_reservation("cpu", 1, "x.device", "x.gpus")


def test_ray_train_workers_follow_the_distill_device():
    d = types.SimpleNamespace(device="auto", gpus_per_worker=1)
    assert workers_device(d) == "cuda" and device.backend(workers_device(d)) == "nccl"
    d = types.SimpleNamespace(device="auto", gpus_per_worker=0)
    assert workers_device(d) == "cpu" and device.backend(workers_device(d)) == "gloo"
    with pytest.raises(device.DeviceError, match="distill.device: cuda needs distill.gpus_per_worker > 0"):
        workers_device(types.SimpleNamespace(device="cuda", gpus_per_worker=0))


def test_collectives_communicate_on_the_cpu_under_gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert distributed.comm_device() == torch.device("cpu")
    finally:
        dist.destroy_process_group()


def test_to_cpu_keeps_cpu_tensors_and_nesting():
    t = torch.arange(3)
    state = {"a": t, "b": [t, (t, 1)], "c": "x"}
    out = device.to_cpu(state)
    assert out["a"] is t and out["b"][1][0] is t and out["b"][1][1] == 1 and out["c"] == "x"
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple)


# ----------------------------------------------------------------------------- the teachers' setting

def teacher(**kw) -> dict:
    return {"name": "mf", "model": "bpr_mf", **kw}


def test_teacher_device_is_strict():
    assert from_dict(TeacherConfig, teacher()).device == "auto"
    with pytest.raises(ConfigError, match=r"device: 'gpu' is not one of \['auto', 'cpu', 'cuda'\]"):
        from_dict(TeacherConfig, teacher(device="gpu"))
    with pytest.raises(ConfigError, match=r"gpus: 1 GPU\(s\) reserved, but device is cpu"):
        from_dict(TeacherConfig, teacher(device="cpu", gpus=1))


def test_teacher_device_is_a_resource_not_a_setting():
    """A teacher trained on one device is the same teacher for a config that asks for another."""
    stored = from_dict(TeacherConfig, teacher(device="cuda", gpus=1))
    assert teacher_train.same_settings(teacher_train._run_settings(stored), from_dict(TeacherConfig, teacher()))


def _config_with(tmp_path: Path, **first_teacher) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["run"] = str(tmp_path / "run")
    data["teachers"][0].update(first_teacher)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@no_gpu
def test_cuda_teacher_without_a_gpu_stops_before_any_work(tmp_path, capsys):
    config = _config_with(tmp_path, device="cuda")
    assert main(["train-teachers", "--config", str(config), "--sequential"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetcomp train-teachers: error: teachers[0].device: cuda, but this process sees no CUDA")
    assert "\n" not in err
    assert not (tmp_path / "run").exists()            # not even the dataset was prepared


def test_cuda_teacher_actor_without_gpus_stops_before_ray_starts(tmp_path, capsys):
    config = _config_with(tmp_path, device="cuda", gpus=0)
    assert main(["train-teachers", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hetcomp train-teachers: error: teachers[0].device: cuda needs teachers[0].gpus > 0 under Ray "
                   "(a Ray process may use only the GPUs reserved for it)")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the distillation's setting

def test_distill_device_is_strict_and_refuses_idle_gpus():
    assert from_dict(DistillConfig, {}).device == "auto"
    assert from_dict(DistillConfig, {"device": "cuda", "gpus_per_worker": 1}).device == "cuda"
    with pytest.raises(ConfigError, match=r"device: 'gpu' is not one of \['auto', 'cpu', 'cuda'\]"):
        from_dict(DistillConfig, {"device": "gpu"})
    with pytest.raises(ConfigError, match=r"gpus_per_worker: 1 GPU\(s\) reserved, but device is cpu: they would "
                                          r"stay idle \(set device: auto or cuda\)$"):
        from_dict(DistillConfig, {"device": "cpu", "gpus_per_worker": 1})


def test_distill_cpu_with_gpus_per_worker_is_refused_at_load(tmp_path):
    config = _config_with(tmp_path)
    with pytest.raises(ConfigError, match=r"distill.gpus_per_worker: 2 GPU\(s\) reserved, but device is cpu"):
        load_run(str(config), ["distill.device=cpu", "distill.gpus_per_worker=2"])


def test_distill_device_is_a_resource_not_a_setting():
    """A checkpoint written on one device resumes on another (the Ray driver also rewrites auto to cpu/cuda)."""
    assert "device" in RESUMABLE_IGNORES
    stored = dataclasses.asdict(DistillConfig(device="cuda", gpus_per_worker=1))
    assert compatible(DistillConfig, stored, DistillConfig(), RESUMABLE_IGNORES)


@no_gpu
def test_cuda_distillation_without_a_gpu_stops_before_any_work(tmp_path):
    out = tmp_path / "student"
    with pytest.raises(device.DeviceError) as e:   # the dataset does not exist: it is not even opened
        distill(str(tmp_path / "no-dataset"), [], DistillConfig(device="cuda"), str(out))
    assert str(e.value).startswith("distill.device: cuda, but this process sees no CUDA device")
    assert "\n" not in str(e.value)
    assert not out.exists()


@no_gpu
def test_cli_cuda_distillation_without_a_gpu_is_one_line(tmp_path, capsys, datasets_dir, monkeypatch):
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    config = _config_with(tmp_path)
    assert main(["distill", "--config", str(config), "--set", "distill.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetcomp distill: error: distill.device: cuda, but this process sees no CUDA device")
    assert "\n" not in err
    assert not (tmp_path / "run" / "distill").exists() or not any((tmp_path / "run" / "distill").rglob("*.pt"))


@no_gpu
def test_cli_cuda_distillation_without_a_gpu_writes_nothing(tmp_path, datasets_dir, monkeypatch):
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    config = _config_with(tmp_path)
    assert main(["distill", "--config", str(config), "--set", "distill.device=cuda"]) == 2
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- device=cpu: the same results

def _data() -> Dataset:
    """A small synthetic dataset with a popularity skew (the one the recorded results below come from)."""
    rng = np.random.default_rng(7)
    n_users, n_items = 300, 200
    pairs = np.unique(rng.integers(0, n_users, 9000) * n_items + (rng.zipf(1.3, 9000) % n_items))
    u, i = pairs // n_items, pairs % n_items
    split = rng.random(len(u))
    part = lambda m: Interactions.from_pairs(u[m], i[m], n_users, n_items)  # noqa: E731
    return Dataset({"n_users": n_users, "n_items": n_items}, part(split < .8), part((split >= .8) & (split < .9)),
                   part(split >= .9))


PARAMS = {"bpr_mf": {"dim": 16}, "cml": {"dim": 16, "n_neg": 3}, "neumf": {"dim": 8, "layers": [16, 8], "n_neg": 2},
          "lightgcn": {"dim": 16, "layers": 2, "n_neg": 2},
          "multvae": {"hidden": 32, "latent": 8, "decoder_hidden": 16, "anneal_steps": 5}, "item_ae": {"hidden": 16}}

# Written by the code before the device path (commit 0b65531, torch 2.13.0+cpu, 1 thread): the mean batch
# loss of epochs 1 and 2, then valid recall@10. On this host the new code reproduces them bit for bit; the
# tolerance only allows for another CPU's float rounding.
RECORDED = {
    "bpr_mf": (0.6933849387698703, 0.6835214495658875, 0.11226353555120679),
    "cml": (1.3242458767361112, 0.9023624791039361, 0.38558925853446396),
    "neumf": (0.6754519012239244, 0.6594528688324822, 0.46036638399652097),
    "lightgcn": (0.6882149444686042, 0.6572579277886285, 0.44799956512285277),
    "multvae": (76.02324676513672, 75.70578002929688, 0.30949119373776907),
    "item_ae": (122.71623992919922, 122.64244079589844, 0.13885083713850838),
}


def _old_train_epoch(model, optimizer, train, cfg, epoch) -> float:
    """teachers.train._train_epoch as it was before the device path (CPU batches, loss.item() per step)."""
    model.train()
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    rng = np.random.default_rng([cfg.seed, epoch])
    total, n = 0.0, 0
    for batch in model.batches(train, cfg.batch_size, rng):
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


def _two_epochs(name: str, data: Dataset, epoch_fn, dev: torch.device | None):
    cfg = TeacherConfig(name=name, model=name, params=PARAMS[name], batch_size=512, seed=3, lr=1e-2)
    torch.manual_seed(cfg.seed)
    model = models.build(name, data.n_users, data.n_items, data.train, cfg.params, dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    losses = [epoch_fn(model, optimizer, data.train, cfg, epoch) for epoch in (1, 2)]
    return model, optimizer, losses


@pytest.mark.parametrize("name", list(RECORDED))
def test_teacher_epochs_on_cpu_give_the_recorded_results(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = _data()
        model, _, losses = _two_epochs(name, data, teacher_train._train_epoch, torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            recall = evaluate_split(model.scorer(), data, "valid", (10,), 64)["recall@10"]
    finally:
        torch.set_num_threads(threads)
    assert (*losses, recall) == pytest.approx(RECORDED[name], rel=1e-5)


@pytest.mark.parametrize("name", ["bpr_mf", "lightgcn", "multvae"])
def test_the_device_loop_on_cpu_equals_the_old_loop_bit_for_bit(name):
    data = _data()
    old_model, old_opt, old_losses = _two_epochs(name, data, _old_train_epoch, None)
    new_model, new_opt, new_losses = _two_epochs(name, data, teacher_train._train_epoch, device.resolve("cpu"))
    assert old_losses == new_losses
    for (k, a), (_, b) in zip(old_model.state_dict().items(), new_model.state_dict().items()):
        assert torch.equal(a, b), k


def test_csr_rows_on_torch_equal_the_numpy_rows():
    train = _data().train
    rows = np.array([5, 0, 299, 17, 5, 42], dtype=np.int64)
    row, ids = csr_rows(torch.from_numpy(train.indptr.astype(np.int64)),
                        torch.from_numpy(train.indices.astype(np.int64)), torch.from_numpy(rows))
    want_row, want_ids = train.rows(rows)
    assert np.array_equal(row.numpy(), want_row) and np.array_equal(ids.numpy(), want_ids)


def test_models_keep_graphs_and_inputs_out_of_checkpoints():
    """Graph and CSR inputs are non-persistent buffers: they move with .to(), checkpoints hold weights only."""
    data = _data()
    for name in ("lightgcn", "multvae", "item_ae"):
        model = models.build(name, data.n_users, data.n_items, data.train, PARAMS[name], torch.device("cpu"))
        buffers = {k for k, _ in model.named_buffers()}
        assert buffers - set(model.state_dict()), name
