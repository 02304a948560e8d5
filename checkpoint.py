"""A training run on disk: its directory, atomic files and checkpoints, resuming, and stopping on a signal.

    RUN/checkpoints/step_NNNNNN/   train_config.json, manifest.json (the step, file hashes, the base model's identity),
                                   model/ target/ (cpu preset) or adapter/ target_adapter/ (IA3: PEFT's format),
                                   optimizer.pt, trainer_state.pt (the step, RNG states)
    RUN/latest                     the newest complete checkpoint, relative to RUN
    RUN/metrics.jsonl, RUN/loss.png

A checkpoint is written into a temporary directory and renamed into place, so a kill leaves either the old or the
new one, never half of one (a temporary directory a kill left behind is removed at the next start). Nothing that
is not finite is ever saved. The newest KEEP checkpoints by step number are kept.
"""
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import torch

KEEP = 2  # checkpoints kept per run (the newest by step)
RUN_FILES = ("checkpoints", "latest", "metrics.jsonl", "loss.png")  # what train.py writes into a run dir


def atomic_write(path, write):
    """write(tmp_path) into a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text: str):
    """`text` into `path` (its folder made if missing), atomically (atomic_write)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not match: the message names the file."""


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_torch(path: Path, **kw):
    try:
        return torch.load(path, **kw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # truncated zip, wrong pickle, ...: torch raises many kinds
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_fingerprint(model) -> str:
    """A cheap identity of a model's weights: sha256 of its norm weights and the first rows of every matrix (they
    differ between, e.g., Llama 3.1 8B and 8B-Instruct, whose shapes are the same). The values are hashed rounded to
    bf16 on the CPU, so the same weights loaded in bf16 on a GPU and in fp32 on a CPU give the same fingerprint."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        bf16 = p.detach()[:4].cpu().float().to(torch.bfloat16)  # fp32 -> bf16 rounds to nearest even anywhere
        h.update(name.encode() + bf16.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest step first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_[0-9]*"), key=step_of, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = Path(run_dir) / "latest"
    return Path(run_dir) / latest.read_text().strip() if latest.is_file() else None


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool):
    """Refuse to mix two runs in one directory; remove the temporary directories of a save a kill interrupted."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file: give a directory")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not resume:
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run ({', '.join(held)}): add --resume to continue it, or "
                             f"give another --out, or --overwrite to delete it and start again")
        for name in held:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for tmp in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def metrics_log(run_dir: Path, step: int, rank: int, resume: bool):
    """-> log(record): one JSON line per record in RUN/metrics.jsonl (rank 0); a resumed run keeps the lines up to
    its checkpoint's step."""
    path = run_dir / "metrics.jsonl"
    if rank:
        return lambda record: None
    old = path.read_text().splitlines() if resume and path.exists() else []
    atomic_write_text(path, "".join(line + "\n" for line in old if json.loads(line)["step"] <= step))

    def log(record):
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def last_good(run_dir: Path) -> str:
    """What to do after a non-finite loss or weight: the newest checkpoint is finite (nothing else is saved)."""
    last = latest_checkpoint(run_dir)
    return (f"The last checkpoint, {last}, is finite: lower --lr or set --grad-clip, then --resume."
            if last else "No checkpoint yet: lower --lr or set --grad-clip and start again.")


def all_finite(modules) -> bool:
    return all(torch.isfinite(p).all() for m in modules if m is not None for p in m.parameters())


def write_dir(final: Path, write, manifest: dict) -> Path:
    """write(tmp) fills a temporary directory beside `final`; a manifest.json with every file's sha256 (and the
    `manifest` entries) is added, then the directory is renamed into place, replacing an older one: a kill leaves
    the old or the new, never half of one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        write(tmp)
        files = {str(p.relative_to(tmp)): file_hash(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_text(tmp / "manifest.json", json.dumps({**manifest, "files": files}, indent=1))
        if final.exists():  # the same step saved twice (periodic + final): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save(run_dir: Path, step: int, config: dict, write_weights, optimizer, trainer_state: dict,
         identity: dict) -> Path:
    """write_weights(tmp_dir) writes the model directories; the rest is written here, then renamed into place."""
    def write(tmp):
        atomic_write_text(tmp / "train_config.json", json.dumps(config, indent=1))
        write_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({**trainer_state, **rng}, tmp / "trainer_state.pt")
    final = write_dir(run_dir / "checkpoints" / f"step_{step:06d}", write, {"step": step, **identity})
    atomic_write_text(run_dir / "latest", str(final.relative_to(run_dir)))
    for old in checkpoints(run_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(ckpt: Path, optimizer, device) -> dict:
    """The optimizer's state and the RNGs as saved; returns the trainer state (the step, ...)."""
    optimizer.load_state_dict(read_torch(ckpt / "optimizer.pt", map_location=device))
    state = read_torch(ckpt / "trainer_state.pt", weights_only=False)
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def verify(ckpt: Path, needed: list[str]) -> dict:
    """The checkpoint's manifest, after checking that every file it lists is there with its hash (else a
    CheckpointError naming the file) and that it saved each of `needed` (else a ValueError: the run never had it)."""
    manifest = read_json(ckpt / "manifest.json")
    for name, digest in manifest.get("files", {}).items():
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing")
        if file_hash(ckpt / name) != digest:
            raise CheckpointError(f"{ckpt / name}: changed since it was saved (hash mismatch)")
    for name in needed:
        if not (ckpt / name).exists():
            raise ValueError(f"{ckpt} has no {name}/, which this run needs (a run saved with other settings); "
                             f"resume with the settings it was trained with, or start another --out")
    return manifest


def resume_point(run_dir: Path, needed: list[str]) -> Path:
    """The newest checkpoint that verifies. An unreadable newer one is renamed unreadable-step_N (kept, never
    deleted) with a warning that names the file, and the one before it is used."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint; drop --resume to start a new run")
    for ckpt in found:
        try:
            verify(ckpt, needed)
        except CheckpointError as e:
            aside = ckpt.with_name(f"unreadable-{ckpt.name}")
            os.replace(ckpt, aside)
            warnings.warn(f"--resume: skipping {ckpt.name}: {e}; moved it to {aside.name}", stacklevel=2)
            continue
        atomic_write_text(run_dir / "latest", str(ckpt.relative_to(run_dir)))
        return ckpt
    raise CheckpointError(f"--resume: no readable checkpoint in {run_dir} (see the warnings above); start a new run "
                          f"with another --out")


class StopRequests:
    """What stop_requests() yields: the signal received (None if none), and a check every rank agrees on."""
    received: signal.Signals | None = None

    def requested(self, world: int = 1, device="cpu") -> bool:
        asked = torch.tensor(float(self.received is not None), device=device)
        if world > 1:  # every rank stops at the same step boundary
            torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
        return bool(asked.item())


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C or SIGTERM during training is noted, and the loop stops after its step (then saves); a second Ctrl-C
    interrupts at once: the with block ends there, the weights are those of the last finished step."""
    stop = StopRequests()

    def on_signal(signum, frame):
        if stop.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.received = signal.Signals(signum)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    try:
        yield stop
    except KeyboardInterrupt:
        stop.received = signal.SIGINT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
