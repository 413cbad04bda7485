"""What users meet, on tiny CPU runs: kills, Ctrl-C, divergence, unwritable or full disks, and bad input.

Every failure must end in one `error: ...` line on stderr naming the file or flag and what to do, the documented
exit code (1 diverged, 2 user error, 130 interrupted; argparse's own 2 for flags) and no output that looks valid
but is not. The kill tests send a real SIGKILL from inside a subprocess at a chosen point (KILL_HOOK), so that
where the run dies is deterministic and the resumed result can be compared with an uninterrupted run.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_vqgan import TINY
from tiny_maskgit import REPO, exit_code, make_tiny_setup, random_transformer_checkpoint, write_images

import inpainting
import prepare_dataset
import training_transformer
import training_vqgan
from models.VQGAN import load_vqgan
from training.token_cache import ensure_token_cache
from utils.checkpoint import load_training_state, load_weights
from utils.cli import EXIT_DIVERGED, TrainingStopped
from utils.image import read_rgb, save_png
from utils.train_utils import check_finite_weights

KILL_HOOK = '''"""python kill_hook.py KIND:N script.py ARGS...: run script.py; SIGKILL this process at a chosen point.
save:N - in the middle of writing the N-th training state: half of its bytes are on disk, the rename never happens;
step:N - right after the N-th optimizer step of this process (its progress-bar update), before its checkpoint."""
import io, os, runpy, signal, sys
import torch, tqdm
kind, n = sys.argv[1].split(":")
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == int(n)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if kind == "save":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "maskgit-training-state-v1" and due():
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            die()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
else:
    real_postfix = tqdm.tqdm.set_postfix
    def set_postfix(self, *args, **kwargs):
        real_postfix(self, *args, **kwargs)
        if due():
            die()
    tqdm.tqdm.set_postfix = set_postfix
sys.argv = sys.argv[2:]
sys.path.insert(0, os.getcwd())
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# ---------------------------------------------------------------------------------------------- helpers

def one_error_line(err: str, code: int, expected: int = 2) -> str:
    """The single `error:` line of a failed run (progress bars may come before it); checks code and no traceback."""
    assert code == expected, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:") or ": error:" in ln]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


def tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp")) if folder.exists() else []


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def log_rows(path: Path) -> list[list[str]]:
    """log.csv without its timing columns, which differ between runs."""
    lines = path.read_text().splitlines()
    keep = [i for i, f in enumerate(lines[0].split(",")) if f not in ("seconds", "images_per_s")]
    return [[row.split(",")[i] for i in keep] for row in lines]


def killed_run(tmp: Path, at: str, script: str, argv: list[str]) -> None:
    """Run `script argv` in a subprocess that SIGKILLs itself at `at` (see KILL_HOOK)."""
    hook = tmp / "kill_hook.py"
    hook.write_text(KILL_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same numerics as this process
    r = subprocess.run([sys.executable, str(hook), at, script, *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


class SigintWhen:
    """Send SIGINT to this process once `path` exists (the trainer saved inside its loop, under its handler)."""

    def __init__(self, path: Path, timeout: float = 120) -> None:
        self.active = True
        self.thread = threading.Thread(target=self._run, args=(path, timeout), daemon=True)

    def _run(self, path: Path, timeout: float) -> None:
        deadline = time.time() + timeout
        while self.active and not path.exists() and time.time() < deadline:
            time.sleep(0.02)
        if self.active and path.exists():
            os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> "SigintWhen":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        self.thread.join()


# ---------------------------------------------------------------------------------------------- the trainers

VQ_TRAIN = {"batch_size": 4, "learning_rate": 1e-3, "disc_start": 3, "disc_base_channels": 8, "dead_code_window": 4}


class Stage:
    """One trainer on tiny data: its flags, its in-process entry point and its state/weights files."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        if name == "vqgan":
            write_images(root / "train", 8, seed=0)
            write_images(root / "val", 4, seed=1)
            self.config = root / "tiny.yml"
            self.config.write_text(yaml.safe_dump({"model_param": TINY, "train_param": VQ_TRAIN}))
            self.script, self.main, self.weights = "training_vqgan.py", training_vqgan.main, "VQGAN.pt"
            self.epochs, self.steps_per_epoch = 3, 2  # the GAN starts at step 3
        else:
            setup = make_tiny_setup(root)
            self.config, self.cache = setup.maskgit_config, root / "tokens.pt"
            ensure_token_cache(load_vqgan(setup.vq_config, setup.vq_ckpt), setup.vq_ckpt, setup.train_dir,
                               setup.val_dir, self.cache, torch.device("cpu"), precision="fp32", verbose=False)
            self.script, self.main, self.weights = "training_transformer.py", training_transformer.main, \
                "transformer_last.pt"
            self.epochs, self.steps_per_epoch = 2, 4  # 16 sequences (with flips), batch 4

    def argv(self, out: Path, *extra, config: Path | None = None) -> list[str]:
        flag = "--config" if self.name == "vqgan" else "--MaskGitConfig"
        argv = [flag, str(config or self.config), "--train_d_path", str(self.root / "train"), "--val_d_path",
                str(self.root / "val"), "--checkpoint-path", str(out), "--device", "cpu", "--seed", "3",
                "--ckpt-interval", "1", "--epochs", str(self.epochs)]
        if self.name == "transformer":
            argv += ["--token-cache", str(self.cache), "--cache-precision", "fp32", "--num_workers", "0",
                     "--batch-size", "4", "--warmup-steps", "2", "--learning-rate", "1e-3"]
        return argv + [str(a) for a in extra]

    def run(self, capsys, out: Path, *extra, config: Path | None = None) -> tuple[int, str]:
        """main(argv) in this process (argv's later flags win); returns (exit code, stderr)."""
        capsys.readouterr()
        code = self.main(self.argv(out, *extra, config=config))
        return code, capsys.readouterr().err


@pytest.fixture(scope="module", params=["vqgan", "transformer"])
def stage(request, tmp_path_factory):
    """A trainer plus one uninterrupted run (`stage.done`), the reference that other tests copy from."""
    st = Stage(request.param, tmp_path_factory.mktemp(request.param))
    st.done = st.root / "done"
    assert st.main(st.argv(st.done)) == 0
    return st


def test_sigkill_mid_write_and_mid_epoch_then_resume_matches_an_uninterrupted_run(stage, tmp_path, capsys):
    out = tmp_path / "run"
    # 1. killed while writing step 3's training state (the vqgan trainer also writes one at the end of epoch 1):
    #    the state of step 2 stays whole, and the stray temp file is garbage
    killed_run(tmp_path, "save:4" if stage.name == "vqgan" else "save:3", stage.script, stage.argv(out))
    before = 2
    assert load_training_state(out / "training_state.pt")["step"] == before
    (stray,) = tmp_files(out)
    assert stray.name.startswith(".training_state.pt.")
    with pytest.raises(Exception):
        torch.load(stray, weights_only=False)
    # 2. resumed, then killed right after step 4 (vqgan) or 6 (transformer), before its checkpoint: mid-epoch
    killed_run(tmp_path, "step:2" if stage.name == "vqgan" else "step:4", stage.script, stage.argv(out, "--resume"))
    state = load_training_state(out / "training_state.pt")
    assert state["step"] > before and state["step"] % stage.steps_per_epoch != 0  # a mid-epoch state
    # 3. resumed to the end: the same weights and loss curve as the uninterrupted run, and no temp left behind
    code, err = stage.run(capsys, out, "--resume")
    assert code == 0, err[-2000:]
    assert tmp_files(out) == []
    done = load_training_state(stage.done / "training_state.pt")
    assert state_dicts_equal(load_training_state(out / "training_state.pt")["model"], done["model"])
    assert state_dicts_equal(load_weights(out / stage.weights), load_weights(stage.done / stage.weights))
    assert log_rows(out / "log.csv") == log_rows(stage.done / "log.csv")
    assert len(log_rows(out / "log.csv")) == stage.epochs + 1


def test_ctrl_c_saves_a_state_exits_130_and_resumes(stage, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    with SigintWhen(out / "training_state.pt"):
        code = stage.main(stage.argv(out, "--epochs", 1000))
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err
    state = load_training_state(out / "training_state.pt")
    assert state["step"] >= 1 and tmp_files(out) == []
    code, err = stage.run(capsys, out, "--resume", "--epochs", state["epoch"] + 1)
    assert code == 0, err[-2000:]
    assert load_training_state(out / "training_state.pt")["epoch"] == state["epoch"] + 1


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(stage, tmp_path, capsys):
    out = tmp_path / "run"
    no_warmup = ["--warmup-steps", 0] if stage.name == "transformer" else []
    code, err = stage.run(capsys, out, "--learning-rate", 1e30, *no_warmup)
    line = one_error_line(err, code, expected=EXIT_DIVERGED)
    assert "the training loss is nan at step 2" in line and "is kept" in line and "--detect-anomaly" in line
    state = load_training_state(out / "training_state.pt")
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert tmp_files(out) == []


def test_weights_that_went_non_finite_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    check_finite_weights(model, 5, tmp_path / "training_state.pt")  # finite: nothing happens
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingStopped, match="weights became NaN/inf at step 5.*no checkpoint") as e:
        check_finite_weights(model, 5, tmp_path / "training_state.pt")
    assert e.value.exit_code == EXIT_DIVERGED


def test_detect_anomaly_flag_runs_autograd_in_anomaly_mode(stage, tmp_path, capsys, monkeypatch):
    seen = []
    backward = torch.Tensor.backward

    def spy(self, *args, **kwargs):
        seen.append(torch.is_anomaly_enabled())
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", spy)
    code, err = stage.run(capsys, tmp_path / "run", "--detect-anomaly", "--epochs", 1)
    assert code == 0, err[-2000:]
    assert seen and all(seen)
    assert not torch.is_anomaly_enabled()  # restored for whoever runs next in this process


class DiskFull:
    """A file that takes `room` more bytes, then fails like a full disk."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self) -> "DiskFull":
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def fill_disk_after(monkeypatch, writes: int) -> None:
    """Every atomic write (checkpoint, log, PNG) after the first `writes` hits a full disk after 100 bytes."""
    real_fdopen, count = os.fdopen, [0]

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        count[0] += 1
        return DiskFull(f, 100) if count[0] > writes else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(stage, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    fill_disk_after(monkeypatch, 4)  # the config copy and the first checkpoints fit
    code, err = stage.run(capsys, out)
    line = one_error_line(err, code)
    assert "No space left on device" in line and "free some disk space" in line
    assert tmp_files(out) == []
    monkeypatch.undo()
    assert load_training_state(out / "training_state.pt")["step"] >= 1  # the last complete one
    for f in out.glob("*.pt"):  # every checkpoint on disk is whole
        torch.load(f, weights_only=False)


def test_unwritable_checkpoint_folder_fails_at_once(stage, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    code, err = stage.run(capsys, tmp_path / "a_file" / "run")
    line = one_error_line(err, code)
    assert "--checkpoint-path" in line and "cannot write there" in line


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", ["wrong_shapes", "weights_as_state", "truncated_state", "typo_in_config",
                                  "mistyped_value", "no_images", "corrupt_image"])
def test_trainer_bad_input_is_one_line_exit_2(stage, tmp_path, capsys, case):
    out = tmp_path / "run"
    shutil.copytree(stage.done, out)
    cfg = yaml.safe_load(stage.config.read_text())
    params = cfg["model_param"] if stage.name == "vqgan" else cfg["model_param"]["Transformer_param"]
    size_key = "latent_dim" if stage.name == "vqgan" else "dim"
    extra: list = ["--resume"]
    if case == "wrong_shapes":
        params[size_key] *= 2
        expected = "does not fit the model config"
    elif case == "weights_as_state":
        shutil.copy(out / stage.weights, out / "training_state.pt")
        expected = "this is a weights file, not a training state"
    elif case == "truncated_state":
        _truncate(out / "training_state.pt")
        expected = "truncated"
    elif case == "typo_in_config":
        params[size_key + "s"] = params.pop(size_key)
        expected = f"'{size_key}s' looks like a misspelling"
    elif case == "mistyped_value":
        params[size_key] = str(params[size_key])
        expected = "must be a positive whole number"
    elif case == "no_images":
        extra = ["--train_d_path", tmp_path / "empty"]
        (tmp_path / "empty").mkdir()
        expected = "holds no .png images"
    else:
        train = Path(shutil.copytree(stage.root / "train", tmp_path / "train"))
        _truncate(train / "image_00003.png")
        extra = ["--train_d_path", train]
        expected = "image_00003.png: cannot read image"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = stage.run(capsys, out, *extra, config=tmp_path / "c.yml")
    line = one_error_line(err, code)
    assert expected in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written


@pytest.mark.parametrize("stage", ["transformer"], indirect=True)
def test_start_from_epoch_refuses_a_training_state_as_weights(stage, tmp_path, capsys):
    out = Path(shutil.copytree(stage.done, tmp_path / "run"))
    shutil.copy(out / "training_state.pt", out / "transformer_epoch_1.pt")
    code, err = stage.run(capsys, out, "--start-from-epoch", 1)
    line = one_error_line(err, code)
    assert "transformer_epoch_1.pt: this is a training-state file, not a weights file" in line


@pytest.mark.parametrize("stage", ["vqgan"], indirect=True)
def test_stage_2_refuses_the_vqgan_training_state_as_vqgan_weights(stage, tmp_path, capsys):
    setup = make_tiny_setup(tmp_path / "stage2")
    cfg = yaml.safe_load(setup.maskgit_config.read_text())
    cfg["model_param"]["VQ_Configs"] = {"VQ_config_path": str(stage.config),
                                        "VQ_CKPT_path": str(stage.done / "training_state.pt")}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    code = training_transformer.main(["--MaskGitConfig", str(tmp_path / "c.yml"), "--checkpoint-path",
                                      str(tmp_path / "run"), "--device", "cpu", "--train_d_path",
                                      str(setup.train_dir), "--val_d_path", str(setup.val_dir)])
    line = one_error_line(capsys.readouterr().err, code)
    assert "training_state.pt: this is a training-state file, not a weights file" in line


def test_debug_shows_the_traceback(stage, tmp_path):
    with pytest.raises(Exception, match="checkpoint not found"):
        stage.main(stage.argv(tmp_path / "none", "--resume", "--debug"))


# ---------------------------------------------------------------------------------------------- inpainting.py

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Tiny MaskGIT with random weights; 4 test pairs: 0-1 with a hole, 2 without any, 3 all hole."""
    root = tmp_path_factory.mktemp("inpaint")
    setup = make_tiny_setup(root, n_train=1, n_val=1)
    ckpt = random_transformer_checkpoint(root)
    rng = np.random.default_rng(0)
    known = np.ones((4, 64, 64), bool)
    known[:2, 16:40, 8:48] = False
    known[3] = False
    (root / "masked_image").mkdir()
    (root / "mask64").mkdir()
    for i in range(4):
        image = np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        masked = np.where(known[i, ..., None], image, 128).astype(np.uint8)
        save_png(masked, root / "masked_image" / f"image_{i:03d}.png")
        save_png(known[i].astype(np.uint8) * 255, root / "mask64" / f"mask_{i:03d}.png")
    return setup, ckpt, root


def inpaint(lab, tmp_path, capsys, *extra, images: Path | None = None, masks: Path | None = None,
            config: Path | None = None, ckpt: Path | None = None) -> tuple[int, str]:
    setup, default_ckpt, root = lab
    argv = ["--device", "cpu", "--MaskGitConfig", str(config or setup.maskgit_config),
            "--load-transformer-ckpt-path", str(ckpt or default_ckpt),
            "--test-maskedimage-path", str(images or root / "masked_image"),
            "--test-mask-path", str(masks or root / "mask64"), "--output-dir", str(tmp_path / "out"),
            "--total-iter", "2", "--no-fid", "--visualize", "1", *map(str, extra)]
    capsys.readouterr()
    code = exit_code(inpainting.main, argv)
    return code, capsys.readouterr().err


def copy_data(lab, tmp_path) -> tuple[Path, Path]:
    root = lab[2]
    return (Path(shutil.copytree(root / "masked_image", tmp_path / "masked_image")),
            Path(shutil.copytree(root / "mask64", tmp_path / "mask64")))


def test_no_hole_is_left_alone_and_all_hole_is_generated(lab, tmp_path, capsys):
    code, err = inpaint(lab, tmp_path, capsys)
    assert code == 0, err[-2000:]
    root = lab[2]
    results = [read_rgb(tmp_path / "out" / "test_results" / f"image_{i:03d}.png") for i in range(4)]
    assert np.array_equal(results[2], read_rgb(root / "masked_image" / "image_002.png"))  # nothing to do
    assert (results[3] != 128).any()  # pure generation from an all-gray input
    assert tmp_files(tmp_path / "out") == []


def test_soft_masks_are_thresholded_at_128_with_one_warning_line(lab, tmp_path, capsys):
    images, masks = copy_data(lab, tmp_path)
    soft = np.full((64, 64), 200, np.uint8)
    soft[:, :32] = 60  # left half below 128: a hole
    save_png(soft, masks / "mask_001.png")
    code, err = inpaint(lab, tmp_path, capsys, images=images, masks=masks)
    assert code == 0, err[-2000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "mask_001.png" in warnings[0] and "thresholded at 128" in warnings[0]
    result = read_rgb(tmp_path / "out" / "test_results" / "image_001.png")
    masked = read_rgb(images / "image_001.png")
    assert np.array_equal(result[:, 32:], masked[:, 32:])  # >= 128 is known and pasted back exactly


def _bad_inpainting_input(case: str, lab, tmp_path) -> tuple[dict, list, str]:
    """Build the bad input of `case`: (inpaint() keyword arguments, extra flags, text the error line must hold)."""
    setup = lab[0]
    images, masks = copy_data(lab, tmp_path)
    kw, extra = {"images": images, "masks": masks}, []
    if case == "missing_folder":
        kw["masks"] = tmp_path / "nowhere"
        return kw, extra, "--test-mask-path"
    if case == "empty_folder":
        for f in images.iterdir():
            f.unlink()
        return kw, extra, "holds no .png images"
    if case == "count_mismatch":
        (masks / "mask_003.png").unlink()
        return kw, extra, "image_003.png: no mask numbered 3"
    if case == "mask_without_image":
        (masks / "mask_003.png").rename(masks / "mask_007.png")
        return kw, extra, "mask_007.png: no masked image numbered 7"
    if case == "corrupt_png":
        _truncate(images / "image_001.png")
        return kw, extra, "image_001.png: cannot read image"
    if case == "corrupt_mask":
        (masks / "mask_002.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return kw, extra, "mask_002.png: cannot read mask"
    if case == "not_64x64":
        save_png(np.zeros((48, 64, 3), np.uint8), images / "image_001.png")
        return kw, extra, "image_001.png: image is 64x48, expected 64x64"
    if case == "not_rgb":
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(images / "image_001.png")
        return kw, extra, "image_001.png: image mode I;16 is not RGB"
    if case == "swapped_folders":
        kw = {"images": masks, "masks": images}
        return kw, extra, "image is grayscale, expected RGB"
    cfg = yaml.safe_load(setup.maskgit_config.read_text())
    if case == "checkpoint_wrong_shapes":
        cfg["model_param"]["Transformer_param"]["dim"] = 64
        expected = "does not fit the model config"
    elif case == "state_as_weights":
        state = tmp_path / "training_state.pt"
        torch.save({"format": "maskgit-training-state-v1", "rng": {"numpy": np.random.get_state()}}, state)
        kw["ckpt"] = state
        expected = "this is a training-state file, not a weights file"
    elif case == "truncated_checkpoint":
        kw["ckpt"] = tmp_path / "t.pt"
        shutil.copy(lab[1], kw["ckpt"])
        _truncate(kw["ckpt"])
        expected = "t.pt: cannot read checkpoint"
    elif case == "config_missing_key":
        del cfg["model_param"]["choice_temperature"]
        expected = "missing key 'model_param.choice_temperature'"
    elif case == "config_typo":
        cfg["model_param"]["gama_type"] = cfg["model_param"].pop("gamma_type")
        expected = "'gama_type' looks like a misspelling"
    elif case == "unwritable_output":
        (tmp_path / "out").write_text("a file where the output folder should be")
        expected = "--output-dir"
    else:
        extra = {"mask_func": ["--mask-func", "zigzag"], "sweet_spot": ["--sweet-spot", 3],
                 "total_iter": ["--total-iter", 0]}[case]
        expected = {"mask_func": "--mask-func", "sweet_spot": "--sweet-spot", "total_iter": "--total-iter"}[case]
    kw["config"] = tmp_path / "c.yml"
    kw["config"].write_text(yaml.safe_dump(cfg))
    return kw, extra, expected


@pytest.mark.parametrize("case", [
    "missing_folder", "empty_folder", "count_mismatch", "mask_without_image", "corrupt_png", "corrupt_mask",
    "not_64x64", "not_rgb", "swapped_folders", "checkpoint_wrong_shapes", "state_as_weights",
    "truncated_checkpoint", "config_missing_key", "config_typo", "unwritable_output", "mask_func", "sweet_spot",
    "total_iter"])
def test_inpainting_bad_input_is_one_line_exit_2_and_writes_nothing(lab, tmp_path, capsys, case):
    kw, extra, expected = _bad_inpainting_input(case, lab, tmp_path)
    code, err = inpaint(lab, tmp_path, capsys, *extra, **kw)
    line = one_error_line(err, code)
    assert expected in line, line
    assert not (tmp_path / "out" / "test_results").exists()


def test_inpainting_debug_shows_the_traceback(lab, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png images"):
        inpaint(lab, tmp_path, capsys, "--debug", images=tmp_path / "empty")


def test_inpainting_disk_full_leaves_only_complete_images(lab, tmp_path, capsys, monkeypatch):
    fill_disk_after(monkeypatch, 2)
    code, err = inpaint(lab, tmp_path, capsys, "--batch-size", 1, "--visualize", 0)
    monkeypatch.undo()
    line = one_error_line(err, code)
    assert "No space left on device" in line and "image_002.png" in line
    written = sorted((tmp_path / "out" / "test_results").iterdir())
    assert [p.name for p in written] == ["image_000.png", "image_001.png"]
    assert all(read_rgb(p).shape == (64, 64, 3) for p in written)
    assert tmp_files(tmp_path / "out") == []


def test_inpainting_ctrl_c_exits_130_leaving_only_complete_images(lab, tmp_path, capsys, monkeypatch):
    real_save, calls = Image.Image.save, [0]

    def save(self, fp, *args, **kwargs):  # Ctrl-C arrives while the third PNG is half written
        calls[0] += 1
        if calls[0] == 3:
            fp.write(b"\x89PNG\r\n\x1a\n")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    code, err = inpaint(lab, tmp_path, capsys, "--batch-size", 1, "--visualize", 0)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    monkeypatch.undo()
    written = sorted((tmp_path / "out" / "test_results").iterdir())
    assert [p.name for p in written] == ["image_000.png", "image_001.png"]
    assert all(read_rgb(p).shape == (64, 64, 3) for p in written) and tmp_files(tmp_path / "out") == []


def test_inpainting_warns_about_older_results_in_the_output_folder(lab, tmp_path, capsys):
    old = tmp_path / "out" / "test_results"
    old.mkdir(parents=True)
    save_png(np.zeros((64, 64, 3), np.uint8), old / "image_746.png")
    code, err = inpaint(lab, tmp_path, capsys, "--partial", 0.5)
    assert code == 0, err[-2000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "1 older images (first: image_746.png)" in warnings[0]


# ---------------------------------------------------------------------------------------------- prepare_dataset.py

def test_prepare_dataset_disk_full_leaves_no_dataset(tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "src", 20, seed=0)
    fill_disk_after(monkeypatch, 10)
    code = prepare_dataset.main(["--source", str(tmp_path / "src"), "--output", str(tmp_path / "cat_face"),
                                 "--test-size", "4"])
    line = one_error_line(capsys.readouterr().err, code)
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dataset, no half-built temp folder


def test_prepare_dataset_unwritable_output_fails_before_any_work(tmp_path, capsys):
    write_images(tmp_path / "src", 3, seed=0)
    (tmp_path / "a_file").write_text("not a folder")
    code = prepare_dataset.main(["--source", str(tmp_path / "src"), "--output", str(tmp_path / "a_file" / "cat_face")])
    line = one_error_line(capsys.readouterr().err, code)
    assert "--output" in line and "cannot write there" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "src"]
