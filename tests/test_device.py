"Data-parallel training through `fundus_lab.train.distributed_context`, for real: two CPU processes, gloo backend."
import os, subprocess, sys
from pathlib import Path

import torch

N_SAMPLES, N_FEATURES, N_CLASSES, BATCH_SIZE, EPOCHS = 32, 6, 3, 8, 2


def _data():
    "The same random dataset in every process."
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_SAMPLES, N_FEATURES, generator=g), torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)


def _train_one_rank(out_dir: Path):
    "Run by each process that torchrun starts: train a linear Learner and save what happened."
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import SGD
    from torch import nn
    from torch.utils.data import TensorDataset
    from fundus_lab.train import distributed_context, is_main_process, world_size

    class Record(Callback):
        "Keep each training batch, and in the first step the synchronised and the process-local gradients."
        order = 90
        def before_fit(self): self.batches, self.first = [], None
        def after_backward(self):
            if not self.training: return
            self.batches.append((self.xb[0].clone(), self.yb[0].clone()))
            if self.first is not None: return
            local_model = self.learn.model.module  # the DistributedDataParallel wrapper's own model
            local_loss = self.learn.loss_func(local_model(*self.xb), *self.yb)
            local = torch.autograd.grad(local_loss, list(local_model.parameters()))
            self.first = {"synced": [p.grad.clone() for p in local_model.parameters()], "local": [g.clone() for g in local]}

    torch.manual_seed(0)
    x, y = _data()
    ds = TensorDataset(x, y)
    dls = DataLoaders.from_dsets(ds, ds, bs=BATCH_SIZE, device="cpu")
    model = nn.Linear(N_FEATURES, N_CLASSES)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    record = Record()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=SGD, cbs=record)
    with distributed_context(learn), learn.no_bar(), learn.no_logging(): learn.fit(EPOCHS, 0.5)
    rank = torch.distributed.get_rank()
    torch.save({"rank": rank, "world_size": world_size(), "main": is_main_process(), "initial": initial,
                "final": {k: v.clone() for k, v in learn.model.state_dict().items()},
                "batches": record.batches, **record.first}, out_dir/f"rank{rank}.pt")


def test_two_process_data_parallel_training(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path/f"rank{r}.pt") for r in range(2)]
    assert [(r["rank"], r["world_size"], r["main"]) for r in ranks] == [(0, 2, True), (1, 2, False)]
    # both processes started from the same weights and ended with the same, changed, weights
    for name in ranks[0]["final"]:
        torch.testing.assert_close(ranks[0]["initial"][name], ranks[1]["initial"][name])
        torch.testing.assert_close(ranks[0]["final"][name], ranks[1]["final"][name], rtol=0, atol=0)
        assert not torch.allclose(ranks[0]["final"][name], ranks[0]["initial"][name])
    # each epoch's training batches split the dataset between the processes: every sample seen once per epoch
    steps_per_epoch = N_SAMPLES // (2 * BATCH_SIZE)
    x, y = _data()
    for epoch in range(EPOCHS):
        seen = torch.cat([b[0] for r in ranks for b in r["batches"][epoch*steps_per_epoch:(epoch+1)*steps_per_epoch]])
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, x.tolist()))
    # the synchronised gradient is the average of the per-process gradients ...
    for p in range(2):
        average = (ranks[0]["local"][p] + ranks[1]["local"][p]) / 2
        torch.testing.assert_close(ranks[0]["synced"][p], average)
        torch.testing.assert_close(ranks[1]["synced"][p], average)
    # ... which is the gradient of the mean loss over both processes' batches together
    model = torch.nn.Linear(N_FEATURES, N_CLASSES)
    model.load_state_dict(ranks[0]["initial"])
    xb = torch.cat([r["batches"][0][0] for r in ranks]); yb = torch.cat([r["batches"][0][1] for r in ranks])
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    torch.testing.assert_close(ranks[0]["synced"][0], model.weight.grad)
    torch.testing.assert_close(ranks[0]["synced"][1], model.bias.grad)


if __name__ == "__main__":
    _train_one_rank(Path(sys.argv[1]))
