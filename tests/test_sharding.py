"""Sharded training (FSDP2, ``--trainer.strategy fsdp2``) and two node ranks, run on this CPU over 127.0.0.1 (gloo):
every process this file starts is bounded in time and ended."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from test_reliability import logged, run_cli
from test_serve import assert_same_answers as served_like_predict
from test_serve import server

from mbti_lightning.export import main as export_main

pytestmark = pytest.mark.slow

#: 1,280 training rows in random batches of 32 (length-grouped batches depend on the number of processes; random
#: ones do not, so one process accumulating two batches takes the steps two processes take), 10 optimizer steps.
DEMO = [
    "--config", str(REPO / "configs/demo.yaml"), "--data.keep_fraction", "0.1", "--data.group_by_length", "false",
    "--model.optimizer", "adamw", "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_train_steps", "5",
]  # fmt: skip
ONE = ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "20"]
SHARDED = ["--trainer.devices", "2", "--trainer.strategy", "fsdp2", "--trainer.val_check_interval", "10"]
LOCAL = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def free_port(low: int = 20000, high: int = 30000) -> int:
    for port in range(low + os.getpid() % 997, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def last_validation(run: Path, version: int = 0) -> dict[str, float]:
    row = [r for r in logged(run, version) if r["val/mcc"]][-1]
    return {k: float(row[k]) for k in ("val/loss", "val/mcc", "val/author/mcc", "val/acc")}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=tol), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The demo's 10 steps in one process, and sharded over two (each rank reporting its shards' sizes)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("sharded")
    assert run_cli(one, "fit", *DEMO, *ONE).returncode == 0
    probe = ["--trainer.callbacks+=probes.ShardSizes", f"--trainer.callbacks.out={two / 'sizes'}"]
    ran = run_cli(two, "fit", *DEMO, *SHARDED, *probe, env=LOCAL)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return {"one": one, "two": two}


def test_a_two_process_sharded_fit_trains_as_one_process_holding_half_the_weights_and_states_each(runs):
    expected, got = last_validation(runs["one"]), last_validation(runs["two"])
    assert got == pytest.approx(expected, abs=1e-5)
    assert_same_weights(runs["one"] / "checkpoints/demo/last.ckpt", runs["two"] / "checkpoints/demo/last.ckpt")
    sizes = [json.loads((runs["two"] / f"sizes.{rank}.json").read_text()) for rank in (0, 1)]
    whole = sizes[0]["whole"]
    for size in sizes:  # each rank: about half the weights, and AdamW's two states of its half
        assert abs(size["weights"] - whole / 2) < 0.01 * whole
        assert size["states"] == 2 * size["weights"]
    assert sizes[0]["weights"] + sizes[1]["weights"] == whole


def test_lora_and_gradient_checkpointing_train_sharded_as_in_one_process(tmp_path):
    options = ["--model.gradient_checkpointing", "true", "--model.peft", "{target_modules: all-linear}"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert run_cli(one, "fit", *DEMO, *ONE, *options).returncode == 0
    ran = run_cli(two, "fit", *DEMO, *SHARDED, *options, env=LOCAL)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert last_validation(two) == pytest.approx(last_validation(one), abs=1e-5)


def test_a_sharded_fit_killed_after_a_checkpoint_resumes_to_the_uninterrupted_runs_end(runs, tmp_path):
    kill = ["--trainer.callbacks+=killing.KillAtStep", "--trainer.callbacks.step=7"]
    validate = ["--trainer.val_check_interval", "5"]  # the checkpoint at step 5 has its metric to rank it by
    died = run_cli(tmp_path, "fit", *DEMO, *SHARDED, *validate, *kill, env=LOCAL)
    assert died.returncode == -signal.SIGKILL
    last = tmp_path / "checkpoints/demo/last.ckpt"
    assert torch.load(last, weights_only=False, mmap=True)["global_step"] == 5  # one whole file, atomically written
    resumed = run_cli(tmp_path, "fit", *DEMO, *SHARDED, *validate, "--ckpt_path", str(last), env=LOCAL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_validation(tmp_path, 1) == pytest.approx(last_validation(runs["two"]), abs=1e-5)
    assert_same_weights(last, runs["two"] / "checkpoints/demo/last.ckpt")


def test_a_sharded_checkpoint_exports_reports_predicts_and_serves_like_any_other(runs, tmp_path):
    ckpt = runs["two"] / "checkpoints/demo/last.ckpt"
    out = tmp_path / "model"
    export_main(["--ckpt", str(ckpt), "--out", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    ran = run_cli(runs["two"], "report", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "report"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads((tmp_path / "report/report.json").read_text())["heads"]["J-P"]["figures"]["rows"] > 0
    with server(ckpt, tmp_path / "server.log") as (port, _):
        served_like_predict(port, tmp_path, None, "--ckpt_path", str(ckpt))


def torchrun(node_rank: int, port: int, cwd: Path, *args: str) -> subprocess.Popen:
    """The docs' two-node recipe on this machine: node `node_rank` of 2, one process each."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "mbti_lightning", "fit", *args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
    ]  # fmt: skip
    env = os.environ | LOCAL | {"PYTHONPATH": str(REPO / "tests")}
    log = (cwd / f"node{node_rank}.log").open("w")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def ended(processes: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    """Each process's exit status; any still running after `timeout` seconds is killed with its group."""
    try:
        return [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def train_losses(run: Path) -> dict[str, float]:
    return {r["step"]: float(r["train/loss"]) for r in logged(run, 0) if r["train/loss"]}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_node_ranks_on_this_machine_train_as_two_processes_of_one_node(strategy, tmp_path):
    two_nodes, one_node = tmp_path / "nodes", tmp_path / "node"
    two_nodes.mkdir()
    args = [*DEMO, "--trainer.strategy", strategy, "--trainer.val_check_interval", "10"]
    port = free_port()
    statuses = ended([torchrun(rank, port, two_nodes, *args) for rank in (0, 1)])
    assert statuses == [0, 0], (two_nodes / "node0.log").read_text()[-3000:]
    one_node.mkdir()
    assert run_cli(one_node, "fit", *args, "--trainer.devices", "2", env=LOCAL).returncode == 0
    assert train_losses(two_nodes) == pytest.approx(train_losses(one_node), abs=1e-6) and train_losses(one_node)
    assert last_validation(two_nodes) == pytest.approx(last_validation(one_node), abs=1e-6)


def test_the_slurm_script_gives_lightning_the_environment_it_reads(tmp_path):
    """scripts/fsdp2.sbatch as `sbatch --nodes 2 --ntasks-per-node 1` would run it, with a stand-in for `srun` that
    starts one task per node on this machine with SLURM's task variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "pids=(); for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
        '  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((i / SLURM_NTASKS_PER_NODE)) "$@" &\n'
        "  pids+=($!); done\n"
        'status=0; for p in "${pids[@]}"; do wait "$p" || status=$?; done; exit $status\n'
    )
    (bin_dir / "srun").chmod(0o755)
    job = 100000 + free_port(15000, 24999) - 15000  # Lightning's port: the job id's last four digits + 15000
    slurm = {
        "SLURM_JOB_ID": str(job), "SLURM_JOB_NAME": "mbti-lightning", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1",
    }  # fmt: skip
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "PATH": f"{bin_dir}:{os.environ['PATH']}"} | slurm
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    process = subprocess.Popen(
        ["bash", str(REPO / "scripts/fsdp2.sbatch"), *DEMO, "--trainer.val_check_interval", "10"],
        cwd=tmp_path, env=env, stdout=(tmp_path / "job.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    assert ended([process]) == [0], (tmp_path / "job.log").read_text()[-3000:]
    log = (tmp_path / "job.log").read_text()
    assert "GLOBAL_RANK: 0" in log or "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log
    assert "MEMBER: 2/2" in log  # both tasks joined one run of world size 2
    rows = list(csv.DictReader((tmp_path / "logs/demo/version_0/metrics.csv").open()))
    assert max(int(r["step"]) for r in rows) == 9 and (tmp_path / "checkpoints/demo/last.ckpt").is_file()


def test_under_fsdp2_the_8bit_optimizer_is_torchaos_and_steps_sharded_weights(monkeypatch):
    """bitsandbytes' 8-bit AdamW cannot step DTensors; `model.optimizer: adamw8bit` then takes torchao's, here on a
    one-process gloo group with a sharded layer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchao.optim import AdamW8bit

    from mbti_lightning.optim import configure_optimizers

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        layer = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 2))
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        groups = {name: "decay" if p.ndim == 2 else "no_decay" for name, p in layer.named_parameters()}
        hp = SimpleNamespace(optimizer="adamw8bit", weight_decay=0.0, learning_rate=1e-2, warmup_steps=0,
                             lr_schedule="constant")  # fmt: skip
        optimizer = configure_optimizers(layer, groups, hp, 10)["optimizer"]
        assert isinstance(optimizer, AdamW8bit)
        before = layer[0].weight.full_tensor().clone()
        layer(torch.randn(8, 256)).sum().backward()
        optimizer.step()
        assert not torch.equal(layer[0].weight.full_tensor(), before)
    finally:
        dist.destroy_process_group()
