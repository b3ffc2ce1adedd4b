"""A Ray cluster of three raylets on 127.0.0.1 (a head and two worker nodes), as a real cluster would
be: preprocessing spreads its actors over the nodes, training places one worker per node, a node
is lost mid-run and a new one joins, a `ray job submit` driver is killed and the job submitted again. Each
interrupted run must end with the weights of the uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import DRAWN_FACES, printed_summary, talking_video

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.heavy]
ROOT = Path(__file__).resolve().parents[2]
NODE = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
STEPS, EVERY = 40, 10  # the fewest that still lose a node and a driver mid-run, between checkpoints


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs: nothing heavy runs there) + 2 worker nodes of 2 CPUs. Any Ray of this session
    is stopped first and a local one started again afterwards for the tests that follow."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    ray.shutdown()
    # Ray swaps a loopback address for the machine's own IP when a node joins; this keeps every node,
    # and every driver that connects, on 127.0.0.1 (the same switch as RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
    loopback_only = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    env_before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the nodes' processes and the job drivers
    # the dashboard serves the job API (`ray job submit`), on 127.0.0.1 only
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    current = Path("/tmp/ray/ray_current_cluster")  # the head recorded itself as this machine's Ray: a
    if current.is_file() and current.read_text().strip() == c.address:  # job started meanwhile by another
        current.unlink()  # test process would attach to it; this test names the address
    workers = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()
    ray_constants.ENABLE_RAY_CLUSTER = loopback_only
    if env_before is None:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    else:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = env_before
    if current.is_file() and current.read_text().strip() == c.address:
        current.unlink()
    if had_ray:
        from letstalk_platform.runtime import init_ray

        init_ray(num_cpus=2, own=True)


def alive_nodes():
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "latest_checkpoint.json"
    return json.loads(pointer.read_text())["step"] if pointer.is_file() else 0


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while latest_step(run_dir) < step:
        assert time.monotonic() - t0 < timeout, f"no checkpoint at step {step} after {timeout} s"
        time.sleep(0.1)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    live = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    ema = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    return {f"live.{k}": v.float() for k, v in live.items()} | {f"ema.{k}": v for k, v in ema.items()}


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def job_status(c, submission_id: str, timeout: float = 60) -> str:
    """The job's final status (FAILED, SUCCEEDED, STOPPED) from the job API, waiting while it runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://{c.webui_url}")
    t0 = time.monotonic()
    while (status := client.get_job_status(submission_id)) in (JobStatus.PENDING, JobStatus.RUNNING):
        assert time.monotonic() - t0 < timeout, f"job {submission_id} still {status}"
        time.sleep(0.5)
    return str(status.value)


def submit_job(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is not up yet ("No available agent", for a
    few seconds after the head starts; the job was not created)."""
    t0 = time.monotonic()
    while True:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if run.returncode == 0 or "No available agent" not in run.stdout + run.stderr or time.monotonic() - t0 > 60:
            return run
        time.sleep(2)


def worker_nodes(checkpoint: Path) -> list[str]:
    return [json.loads((checkpoint / f"rank{r}.json").read_text())["node_id"] for r in range(2)]


def test_cluster_preprocess_train_lose_a_node_and_a_driver(cluster, bundle, tmp_path):
    import ray

    from letstalk_platform.preprocess import PreprocessConfig, run_preprocess
    from letstalk_platform.runtime import with_overrides
    from letstalk_platform.train import TrainConfig, run_training

    c, (w1, w2) = cluster
    worker_ids = alive_nodes()
    assert len(worker_ids) == 2

    # preprocessing: the two tokenizer actors (and the decoders) sit on both worker nodes
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        talking_video(raw / f"spk{i}.mp4", 48, seed=i, identity=f"spk{i}")
    manifest = run_preprocess(PreprocessConfig(input=str(raw), output=str(tmp_path / "shards"), model=str(bundle),
                                               stride=2, eval_fraction=0.0, tokenizers=2, decoders=2,
                                               faces=DRAWN_FACES))
    assert manifest.counts()["done"] == 4
    actors = ray._private.state.actors().values()  # the GCS's record of every actor, dead ones included
    tokenizer_nodes = {a["Address"]["NodeID"] for a in actors if "Tokenizer" in a["ActorClassName"]}
    assert tokenizer_nodes == worker_ids, tokenizer_nodes

    uri = f"sqlite:///{tmp_path}/m.db"
    settings = {"model": {"preset": "tiny"}, "data": {"path": str(tmp_path / "shards"), "batch_size": 2},
                "optim": {"lr": 1e-3, "ema_decay": 0.9},
                "scaling": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD",
                            "max_failures": 3},
                "tracking": {"storage": str(tmp_path / "runs"), "experiment": "multinode", "mlflow_uri": uri,
                             "register_name": None},
                "steps": STEPS, "checkpoint_every": EVERY, "log_every": 1, "sample_clips": 0}

    def config(name: str) -> dict:
        return with_overrides(settings, {"tracking.name": name})

    # 1. uninterrupted: one worker on each node
    reference = run_training(TrainConfig.model_validate(config("reference")))
    ref_ckpt = Path(reference["checkpoint"])
    assert reference["steps"] == STEPS and set(worker_nodes(ref_ckpt)) == worker_ids

    # 2. a worker node is lost mid-run; a new node joins; the run resumes on it
    run_dir = tmp_path / "runs" / "node-lost"
    result: dict = {}
    node_lost = TrainConfig.model_validate(config("node-lost"))
    thread = threading.Thread(target=lambda: result.update(run_training(node_lost)))
    thread.start()
    wait_for_step(run_dir, EVERY)
    c.remove_node(w2, allow_graceful=False)
    replacement = c.add_node(**NODE)
    c.wait_for_nodes()
    thread.join(timeout=600)
    assert not thread.is_alive() and result["steps"] == STEPS
    lost_ckpt = Path(result["checkpoint"])
    assert replacement.node_id in worker_nodes(lost_ckpt) and w2.node_id not in worker_nodes(lost_ckpt)
    logged = [m.step for m in MlflowClient(uri).get_metric_history(result["run_id"], "loss")]
    assert sorted(set(logged)) == list(range(1, STEPS + 1)) and logged.count(1) == 1  # continuous, not restarted
    node_diff = max_diff(weights(ref_ckpt), weights(lost_ckpt))

    # 3. a job submitted with `ray job submit`; its driver is killed (SIGKILL) mid-run; the same job
    # submitted again resumes and finishes
    config_file = tmp_path / "driver.yaml"
    config_file.write_text(yaml.safe_dump(config("driver-lost")))
    run_dir = tmp_path / "runs" / "driver-lost"
    ray_cli = str(Path(sys.executable).parent / "ray")
    submit = [ray_cli, "job", "submit", "--address", f"http://{c.webui_url}"]
    entrypoint = ["--", sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config_file)]
    first = submit_job(submit + ["--no-wait", "--submission-id", "driver-lost-1"] + entrypoint, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    wait_for_step(run_dir, EVERY)
    drivers = subprocess.run(["pgrep", "-f", f"jobs/train.py --config {config_file}"], capture_output=True,
                             text=True)
    pids = [int(p) for p in drivers.stdout.split()]
    assert pids, "the job's driver process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed_at = latest_step(run_dir)
    assert killed_at < STEPS
    assert job_status(c, "driver-lost-1") == "FAILED"  # what the user sees before submitting again
    again = submit_job(submit + ["--submission-id", "driver-lost-2"] + entrypoint, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert f"resumed at step {killed_at}" in again.stdout + again.stderr
    summary = printed_summary(again.stdout)
    driver_diff = max_diff(weights(ref_ckpt), weights(Path(summary["checkpoint"])))
    print(f"multinode: uninterrupted {reference['seconds']} s; node lost after step {EVERY}: "
          f"{result['seconds']} s, max |diff| {node_diff:.3g}; driver killed after step {killed_at}: "
          f"max |diff| {driver_diff:.3g} (weights and EMA vs the uninterrupted run)")
    assert node_diff <= 1e-6 and driver_diff <= 1e-6
