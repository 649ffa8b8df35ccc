"""The jobs as users run them on a cluster: `ray job submit --working-dir . -- python -m ...`
against a cluster started with `ray start --head`. Ray runs the job from a temporary copy of the
project; relative paths in the config still resolve against the project (README: "Paths"), so the
adapter lands in the project's own `runs/`, where the README says."""

import shutil
import time

import pytest

from tests.conftest import ROOT, shared_file

OUT = "runs/test-job-submit"  # relative on purpose: resolved against the project root


@pytest.fixture(scope="module")
def client(ray_head_cluster, monkeypatch_module):
    from ray.job_submission import JobSubmissionClient

    shared_file("stories260K/params.json")
    shared_file("alpaca_data.json")
    shutil.rmtree(ROOT / OUT, ignore_errors=True)
    yield JobSubmissionClient(ray_head_cluster["dashboard"])
    shutil.rmtree(ROOT / OUT, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    yield mp
    mp.undo()


def _submit(client, entrypoint: str, timeout_s: float = 420) -> str:
    """Submit with --working-dir semantics (the project folder uploaded, the job run inside Ray's
    copy of it); return the job's logs once it succeeded."""
    from ray.job_submission import JobStatus

    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job} still {status} after {timeout_s} s"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def test_preprocess_job_submitted_to_a_running_cluster(client):
    logs = _submit(
        client,
        f"python -m pipelines.preprocess --config configs/tiny-cpu.yaml "
        f"--set data.limit=50 --set data.out={OUT}/data50",
    )
    assert (ROOT / OUT / "data50" / "stats.json").is_file(), logs[-2000:]
    assert "wrote" in logs and "working_dir_files" not in logs.split("[preprocess]")[-1]


def test_training_job_submitted_to_a_running_cluster_writes_its_adapter_into_the_project(client):
    logs = _submit(
        client,
        "python -m pipelines.train --config configs/tiny-cpu.yaml --set name=submitted "
        f"--set output_dir={OUT} --set data.out={OUT}/data48 --set data.limit=48 "
        "--set optim.epochs=1 --set checkpoint.every_n_steps=null",
    )
    adapter = ROOT / OUT / "submitted" / "adapter" / "adapter.safetensors"
    assert adapter.is_file(), logs[-3000:]
    assert "(Ray: existing cluster)" in logs  # joined the cluster, did not start its own
    # What the user sees: our progress lines, not Ray's per-operator and per-worker chatter.
    assert "[train] step" in logs and "[train] done" in logs
    assert len(logs.splitlines()) < 80, logs
