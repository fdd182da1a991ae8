"Resuming training: a run killed with SIGKILL and resumed from its epoch checkpoint ends exactly like an uninterrupted run."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from fundus_lab.checkpoints import CheckpointError, load_training_checkpoint

EPOCHS, KILL_AFTER = 4, 2
TRAIN = textwrap.dedent("""
    import sys
    from fundus_lab.data import read_dataset
    from fundus_lab.train import train_model
    data, save_dir, resume = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    df = read_dataset(data + "/labels.csv", img_dir=data + "/images")
    train_model(df, save_dir, model_name="test_efficientnet", pretrained=False, image_size=32, batch_size=6,
                epochs=%d, lr=1e-2, device="cpu", random_seed=3, save_freq=1, loss="focal", resume=resume)
""" % EPOCHS)
NOT_REPRODUCIBLE = ("epoch_time_s", "peak_memory_mb")


def train_process(*args) -> subprocess.Popen:
    "A `python -c` process training the tiny model; output goes to a log file beside the run."
    log = open(Path(args[1]).parent/f"{Path(args[1]).name}.log", "a")
    return subprocess.Popen([sys.executable, "-c", TRAIN, *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "IN_TEST": "1", "OMP_NUM_THREADS": "1"})


def history(save_dir:Path) -> list[dict]:
    records = json.loads((save_dir/"training_history.json").read_text())
    return [{k: v for k, v in r.items() if k not in NOT_REPRODUCIBLE} for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fundus_lab.synth import write_dataset
    out = tmp_path_factory.mktemp("resume_data")
    write_dataset("dr", out, n=24, size=64, seed=0)
    return out


def test_killed_and_resumed_run_equals_uninterrupted_run(data, tmp_path):
    reference = train_process(data, tmp_path/"reference")
    killed = train_process(data, tmp_path/"killed")
    checkpoint = tmp_path/"killed"/f"checkpoint_epoch_{KILL_AFTER}.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline: time.sleep(0.05)
    assert checkpoint.exists(), (tmp_path/"killed.log").read_text()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert len(history(tmp_path/"killed")) < EPOCHS
    resumed = train_process(data, tmp_path/"killed", checkpoint)
    assert resumed.wait(timeout=300) == 0, (tmp_path/"killed.log").read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path/"reference.log").read_text()[-3000:]
    expected = history(tmp_path/"reference")
    assert [r["epoch"] for r in expected] == list(range(1, EPOCHS + 1))
    assert history(tmp_path/"killed") == expected
    best = [torch.load(d/"best_model.pth", weights_only=True) for d in (tmp_path/"reference", tmp_path/"killed")]
    best_metrics = [{k: v for k, v in b["config"]["valid_metrics"].items() if k not in NOT_REPRODUCIBLE} for b in best]
    assert best_metrics[0] == best_metrics[1]
    for name, weight in best[0]["model_state_dict"].items(): assert torch.equal(weight, best[1]["model_state_dict"][name]), name
    assert "Resuming from" in (tmp_path/"killed.log").read_text()


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path/"checkpoint_epoch_1.pth"
    torch.save({"format_version": 1, "kind": "training_checkpoint", "weights": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="checkpoint_epoch_1.pth.*truncated or corrupt"):
        load_training_checkpoint(path)
