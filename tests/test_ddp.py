"""Two CPU processes (gloo) train the tiny model a few steps with DDP; both must end with identical weights."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from tiny_maskgit import make_tiny_setup

import training_transformer
from utils.checkpoint import load_training_state, load_weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, argv: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model, ema = training_transformer.train(training_transformer.parse_args(argv))
    torch.save({"raw": model.state_dict(), "ema": ema.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    tiny = make_tiny_setup(tmp_path / "tiny", n_train=8, n_val=4)
    out = tmp_path / "run"
    argv = ["--MaskGitConfig", str(tiny.maskgit_config), "--train_d_path", str(tiny.train_dir), "--val_d_path",
            str(tiny.val_dir), "--checkpoint-path", str(out), "--device", "cpu", "--num_workers", "0",
            "--batch-size", "2", "--accum-grad", "2", "--epochs", "2", "--warmup-steps", "1",
            "--learning-rate", "1e-3", "--cache-precision", "fp32"]
    mp.spawn(_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)

    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for kind, saved in [("raw", "transformer_raw_last.pt"), ("ema", "transformer_last.pt")]:
        w0, w1 = r0[kind], r1[kind]
        assert all(torch.equal(w0[k], w1[k]) for k in w0), kind
        on_disk = load_weights(out / saved)  # written by rank 0 only
        assert all(torch.equal(on_disk[k], w0[k]) for k in w0), kind
    state = load_training_state(out / "training_state.pt")
    # 16 sequences (8 images + flips) / (2 ranks x batch 2 x accum 2) = 2 steps per epoch
    assert state["world_size"] == 2 and state["step"] == 4 and len(state["rng"]) == 2
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
