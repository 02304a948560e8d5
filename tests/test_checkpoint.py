"""checkpoint.py and train.py's guards around it: one run per run dir (--resume / --overwrite), pruning, nothing
non-finite ever saved, resuming from the newest checkpoint that matches its manifest (a damaged one is kept aside
and the one before it used, exactly), bad input refused before any work, Ctrl-C / SIGTERM save and exit non-zero."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import data
import dqn
import llama
import policy
import test_train
import train
from test_train import (ROOT, SMALL_LEARNER, argv, assert_same_weights, small_data,  # noqa: F401 (autouse fixture)
                        small_train_script, tiny, weights)

pytestmark = pytest.mark.filterwarnings("ignore:pack_slices dropped")  # 160-token slices drop long episodes


def snapshot(root: Path) -> dict:
    """Every file under root -> its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps_in(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def assert_finite_checkpoint(ckpt: Path):
    for name in ("model", "target"):
        assert all(torch.isfinite(t).all() for t in weights(ckpt, name).values()), (ckpt, name)
    state = torch.load(ckpt / "optimizer.pt")["state"]
    assert state and all(torch.isfinite(t).all() for s in state.values() for t in s.values())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished default run shrunk in size (4 steps, checkpoints at steps 2 and 4): tests resume copies of it."""
    with pytest.MonkeyPatch.context() as m:
        for key, value in SMALL_LEARNER.items():
            m.setitem(data.LEARNER, key, value)
        m.setattr(test_train, "DATA", tmp_path_factory.getbasetemp() / "data")
        return train.train(tiny(tmp_path_factory.mktemp("straight")))


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------------- the run dir

def test_a_run_dir_holding_a_run_is_refused_without_resume(tmp_path):
    for name in checkpoint.RUN_FILES:  # any one of a run's files marks the dir as a run
        run = tmp_path / name.replace(".", "_")
        (run / "checkpoints" if name == "checkpoints" else run).mkdir(parents=True)
        if name != "checkpoints":
            (run / name).write_text("x")
        before = snapshot(run)
        with pytest.raises(ValueError, match=rf"already holds a run \({name}\): add --resume to continue it, or give "
                                             r"another --out, or --overwrite to delete it and start again"):
            checkpoint.prepare_run_dir(run, resume=False, overwrite=False)
        assert snapshot(run) == before and (run / name).exists()
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    checkpoint.prepare_run_dir(empty, resume=False, overwrite=False)  # other files are not a run
    checkpoint.prepare_run_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file: give a directory"):
        checkpoint.prepare_run_dir(tmp_path / "file", resume=False, overwrite=False)


def test_a_second_run_is_refused_in_one_line_and_overwrite_starts_again(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, steps=2, save_every=1)
    run = train.train(cfg)
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(argv(cfg))
    message = str(e.value.code)
    assert message.startswith("train.py: error: ") and "\n" not in message
    assert all(s in message for s in ("--resume", "another --out", "--overwrite", str(run)))
    assert snapshot(run) == before  # nothing deleted, nothing written
    with pytest.raises(ValueError, match="already holds a run"):  # --debug: the exception itself
        train.main(argv(cfg) + ["--debug"])
    # --overwrite: the old run's files go, the new run starts from step 0 (files that are not a run's stay)
    train.main(argv(cfg) + ["--overwrite", "--steps", "1"])
    assert steps_in(run) == ["step_000001"] and (run / "latest").read_text() == "checkpoints/step_000001"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "checkpoints" / "step_000001" / "train_config.json").read_text())["steps"] == 1


def test_pruning_keeps_the_newest_checkpoints_by_step_number(tmp_path, monkeypatch):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)

    def save(step):
        return checkpoint.save(tmp_path, step, {"step": step}, lambda tmp: (tmp / "w.txt").write_text(str(step)),
                               optimizer, {"step": step}, {"note": "x"})
    for step in (5, 1):
        save(step)
    assert steps_in(tmp_path) == ["step_000001", "step_000005"]
    time.sleep(0.01)
    ckpt = save(3)  # written last, but step 1 is the oldest by step number
    assert steps_in(tmp_path) == ["step_000003", "step_000005"] and (tmp_path / "latest").read_text() == \
        "checkpoints/step_000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["note"] == "x"
    assert manifest["files"] == {k: v for k, v in snapshot(ckpt).items() if k != "manifest.json"}
    assert set(manifest["files"]) == {"train_config.json", "w.txt", "optimizer.pt", "trainer_state.pt"}
    monkeypatch.setattr(checkpoint, "KEEP", 3)
    save(7), save(2)
    assert steps_in(tmp_path) == ["step_000003", "step_000005", "step_000007"]
    save(7)  # the same step again (a periodic and the final save): replaced
    assert steps_in(tmp_path) == ["step_000003", "step_000005", "step_000007"]

    def fails(tmp):
        (tmp / "w.txt").write_text("half")
        raise OSError("disk full")
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="disk full"):  # a failed save leaves no trace: no half checkpoint, no temp dir
        checkpoint.save(tmp_path, 9, {}, fails, optimizer, {}, {})
    assert snapshot(tmp_path) == before and not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------- non-finite

def test_a_huge_lr_stops_the_run_in_one_line_keeping_its_finite_checkpoints(tmp_path):
    """--lr 1e38 without clipping: step 1 throws the weights to ~1e36 (finite, saved), step 2's gradient is not
    finite: the run stops before that update, in one line naming the step and the last (finite) checkpoint."""
    cfg = tiny(tmp_path, lr=1e38, grad_clip=0.0, steps=3, save_every=1, eval_every=0)
    run = Path(cfg.out)
    with pytest.raises(SystemExit) as e:
        train.main(argv(cfg))
    message = str(e.value.code)
    assert re.fullmatch(rf"train\.py: error: loss \S+, gradient norm (nan|inf) at step 2; stopped before the update\. "
                        rf"The last checkpoint, {re.escape(str(run))}/checkpoints/step_000001, is finite: lower --lr "
                        rf"or set --grad-clip, then --resume\.", message), message
    assert steps_in(run) == ["step_000001"] and (run / "latest").read_text() == "checkpoints/step_000001"
    assert_finite_checkpoint(run / "checkpoints" / "step_000001")
    assert weights(run / "checkpoints" / "step_000001")["lm_head.weight"].abs().max() > 1e30  # it did blow up


def test_an_lr_that_overflows_adamw_itself_stops_in_one_line(tmp_path):
    """--lr 1e39 (1e38 in the first warmup step) overflows float32 inside AdamW, which raises before it writes a weight; the run stops in one line naming the
    step, with no checkpoint saved."""
    cfg = tiny(tmp_path, lr=1e39, grad_clip=0.0, steps=2, save_every=1, eval_every=0)
    with pytest.raises(SystemExit) as e:
        train.main(argv(cfg))
    message = str(e.value.code)
    assert message.startswith("train.py: error: the update of step 1 overflowed (lr 1e+38") and "\n" not in message
    assert "No checkpoint yet" in message and not list(Path(cfg.out).glob("checkpoints/step_*"))


def test_an_update_that_leaves_the_weights_non_finite_is_never_saved(tmp_path, monkeypatch):
    """The weights are checked right after optimizer.step: an update of step 3 that overflows stops the run there,
    naming the step and the last checkpoint; every checkpoint on disk (weights, target, optimizer state) is
    finite."""
    calls, step = [0], torch.optim.AdamW.step

    def overflowing_step(self, *a, **kw):
        out = step(self, *a, **kw)
        calls[0] += 1
        if calls[0] == 3:
            self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    cfg = tiny(tmp_path, steps=4, save_every=1, eval_every=0)
    run = Path(cfg.out)
    with pytest.raises(FloatingPointError, match=rf"the update of step 3 made the weights non-finite "
                                                 rf"\(lr 0\.0009\d*\)\. The last checkpoint, "
                                                 rf"{re.escape(str(run))}/checkpoints/step_000002, is finite"):
        train.train(cfg)
    assert calls[0] == 3
    assert steps_in(run) == ["step_000001", "step_000002"]
    assert (run / "latest").read_text() == "checkpoints/step_000002"
    for name in steps_in(run):
        assert_finite_checkpoint(run / "checkpoints" / name)


def test_a_nan_loss_stops_before_the_update(tmp_path, monkeypatch):
    """A NaN TD loss in step 3: the run stops before optimizer.step, so the weights in memory are still step 2's."""
    calls, td_loss_on = [0], train.td_loss_on
    models = []

    def nan_from_step_3(batch, nets, cfg):
        models.append(nets.model)
        loss, aux = td_loss_on(batch, nets, cfg)
        if torch.is_grad_enabled():  # the training micro-batches (the held-out loss runs without gradients)
            calls[0] += 1
            if calls[0] > 2 * 2:
                loss = loss * float("nan")
        return loss, aux
    monkeypatch.setattr(train, "td_loss_on", nan_from_step_3)
    cfg = tiny(tmp_path)
    run = Path(cfg.out)
    with pytest.raises(FloatingPointError, match=r"loss nan, gradient norm nan at step 3; stopped before the update"
                                                 rf"\. The last checkpoint, {re.escape(str(run))}/checkpoints/"
                                                 r"step_000002, is finite"):
        train.train(cfg)
    assert steps_in(run) == ["step_000002"] and (run / "latest").read_text() == "checkpoints/step_000002"
    assert_finite_checkpoint(run / "checkpoints" / "step_000002")
    saved = weights(run / "checkpoints" / "step_000002")
    names = {v: k for k, v in llama.hf_names(models[-1].args).items()}
    assert all(torch.equal(models[-1].state_dict()[names[k]], v) for k, v in saved.items())  # no update happened


def test_a_non_finite_target_is_never_saved(tmp_path, monkeypatch):
    """The weights are checked before every save, the target's too."""
    calls, polyak = [0], dqn.polyak_update

    def poisoned(target_params, online_params, alpha=0.1):
        target_params = list(target_params)
        polyak(target_params, online_params, alpha)
        calls[0] += 1
        if calls[0] == 2:  # the target's update in step 2 (one per step)
            target_params[0].data[0, 0] = float("inf")
    monkeypatch.setattr(dqn, "polyak_update", poisoned)
    cfg = tiny(tmp_path, save_every=1, eval_every=0)
    run = Path(cfg.out)
    with pytest.raises(FloatingPointError, match=r"weights are not finite at step 2; not saved\. The last checkpoint, "
                                                 rf"{re.escape(str(run))}/checkpoints/step_000001, is finite"):
        train.train(cfg)
    assert steps_in(run) == ["step_000001"]
    assert_finite_checkpoint(run / "checkpoints" / "step_000001")


def test_a_non_finite_held_out_loss_stops_the_run(tmp_path, monkeypatch):
    calls, td_loss_on = [0], train.td_loss_on

    def nan_held_out(*a, **kw):
        loss, aux = td_loss_on(*a, **kw)
        if not torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > 2:  # after the untrained model's held-out loss (2 slices)
                loss = loss * float("nan")
        return loss, aux
    monkeypatch.setattr(train, "td_loss_on", nan_held_out)
    cfg = tiny(tmp_path, save_every=1)
    run = Path(cfg.out)
    with pytest.raises(FloatingPointError, match=rf"held-out loss nan at step 2\. The last checkpoint, "
                                                 rf"{re.escape(str(run))}/checkpoints/step_000001, is finite"):
        train.train(cfg)
    assert steps_in(run) == ["step_000001"]


# ---------------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("damage, named", [
    ("truncate trainer_state.pt", "trainer_state.pt"),
    ("truncate optimizer.pt", "optimizer.pt"),
    ("truncate model/tokenizer.model", "model/tokenizer.model"),
    ("change train_config.json", "train_config.json"),
    ("remove target", "target/"),
    ("garble manifest.json", "manifest.json"),
])
def test_resume_skips_a_damaged_checkpoint_and_equals_the_uninterrupted_run(tmp_path, straight, damage, named,
                                                                            capsys):
    """The newest checkpoint (step 4) damaged: --resume warns naming the file, keeps it aside as
    unreadable-step_000004, continues from step 2, and ends bit for bit where the uninterrupted run ended."""
    run = copy_of(straight, tmp_path)
    newest = run / "checkpoints" / "step_000004"
    action, _, name = damage.partition(" ")
    path = newest / name
    if action == "truncate":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif action == "change":
        path.write_text(path.read_text().replace('"seed": 0', '"seed": 1'))
    elif action == "remove":
        shutil.rmtree(path)
    else:
        path.write_text(path.read_text()[:-20])
    kept = snapshot(newest)
    (run / "checkpoints" / ".tmp-orphan").mkdir()  # a save a kill interrupted
    (run / "checkpoints" / ".tmp-orphan" / "optimizer.pt").write_text("half")
    with pytest.warns(UserWarning, match=rf"--resume: skipping step_000004: .*step_000004/{named}.*; moved it to "
                                         r"unreadable-step_000004"):
        resumed = train.train(tiny(tmp_path, resume=True))
    assert "resuming at step 2" in capsys.readouterr().err
    aside = run / "checkpoints" / "unreadable-step_000004"
    assert snapshot(aside) == kept  # kept as it was, never deleted
    assert not (run / "checkpoints" / ".tmp-orphan").exists()
    assert steps_in(run) == ["step_000002", "step_000004", "unreadable-step_000004"]
    a, b = straight / "checkpoints" / "step_000004", resumed / "checkpoints" / "step_000004"
    for part in ("model", "target"):
        assert_same_weights(weights(a, part), weights(b, part))
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in straight_rows]


def test_resume_point_and_its_errors(tmp_path, straight):
    run = copy_of(straight, tmp_path)
    needed = policy.needed_files(tiny(tmp_path))
    assert needed == ["model", "target"]
    assert checkpoint.resume_point(run, needed) == run / "checkpoints" / "step_000004"
    for step in ("step_000002", "step_000004"):  # no checkpoint verifies: both kept aside, an error
        f = run / "checkpoints" / step / "target" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))  # one bit flipped
    with pytest.warns(UserWarning, match="target/model.safetensors: changed since it was saved"):
        with pytest.raises(checkpoint.CheckpointError, match=rf"no readable checkpoint in {re.escape(str(run))}"):
            checkpoint.resume_point(run, needed)
    assert steps_in(run) == ["unreadable-step_000002", "unreadable-step_000004"]
    with pytest.raises(FileNotFoundError, match="has no checkpoint; drop --resume"):
        checkpoint.resume_point(run, needed)
    with pytest.raises(FileNotFoundError, match="has no checkpoint; drop --resume"):
        train.train(tiny(tmp_path / "none", resume=True))
    # the JSON and torch files of a checkpoint: errors name the file
    (tmp_path / "bad.json").write_text('{"step": ')
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(tmp_path))}/bad.json: not valid JSON"):
        checkpoint.read_json(tmp_path / "bad.json")
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(tmp_path))}/none.json: missing"):
        checkpoint.read_json(tmp_path / "none.json")
    (tmp_path / "bad.pt").write_bytes((straight / "checkpoints" / "step_000004" / "optimizer.pt").read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(tmp_path))}/bad.pt: unreadable"):
        checkpoint.read_torch(tmp_path / "bad.pt")
    assert issubclass(checkpoint.CheckpointError, ValueError)  # train.main reports it in one line


def test_load_policy_checks_the_manifest(tmp_path, straight):
    run = copy_of(straight, tmp_path)
    model = policy.load_policy(run)[0]  # the target network plays
    target = weights(run / "checkpoints" / "step_000004", "target")
    assert torch.equal(model.norm.weight, target["model.norm.weight"])
    f = run / "checkpoints" / "step_000004" / "target" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    for online in (False, True):  # a damaged file is refused whichever network plays
        with pytest.raises(checkpoint.CheckpointError, match="step_000004/target/model.safetensors: changed"):
            policy.load_policy(run, online=online)


def test_resume_with_weights_the_run_never_kept_is_refused(tmp_path, capsys):
    """A cpu-preset run resumed as an IA3 preset: no checkpoint has adapter/, so nothing is skipped or renamed;
    one error naming the missing dir."""
    cfg = tiny(tmp_path, steps=2)
    run = train.train(cfg)
    assert steps_in(run) == ["step_000002"] and not (run / "checkpoints" / "step_000002" / "adapter").exists()
    tok = policy.small_tokenizer()
    llama.save(policy.small_model(cfg, tok.n_words), tmp_path / "base")
    tok.save(tmp_path / "base")
    keep = ("n_maps", "sets_per_map", "context_len", "slices_per_step", "micro_batch", "data_dir", "out")
    ia3_cfg = train.make_config("smollm2", **{k: getattr(cfg, k) for k in keep}, model_dir=str(tmp_path / "base"),
                                steps=4, resume=True)
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(argv(ia3_cfg))
    message = str(e.value.code)
    assert message.startswith("train.py: error: ") and "\n" not in message
    assert f"{run}/checkpoints/step_000002 has no adapter/, which this run needs" in message
    assert snapshot(run) == before
    train.train(tiny(tmp_path, steps=3, resume=True))  # with its own settings it continues
    assert steps_in(run) == ["step_000002", "step_000003"]


def test_resume_of_another_model_is_refused(tmp_path, straight):
    run = copy_of(straight, tmp_path)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"--resume: .*step_000004 is another model \(dim: 32 there, 64 now"):
        train.train(tiny(tmp_path, dim=64, resume=True))
    with pytest.raises(ValueError, match=r"another model \(canvas: True there, False now; compose: True there, False"):
        train.train(tiny(tmp_path, canvas=False, compose=False, resume=True))
    with pytest.raises(ValueError, match=r"another model \(recap: True there, False now"):
        train.train(tiny(tmp_path, recap=False, resume=True))
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, error", [
    (["--steps", "-3"], "--steps must be >= 0, got -3"),
    (["--slices-per-step", "0"], "--slices-per-step must be at least 1, got 0"),
    (["--eval-slices", "0"], "--eval-slices must be at least 1, got 0"),
    (["--micro-batch", "0"], "--micro-batch must be at least 1, got 0"),
    (["--dim", "30"], "--dim 30: the cpu model's heads are 32 wide, give a multiple of 32"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--alpha", "2"], r"--alpha must be in \[0, 1\], got 2.0"),
    (["--aux-facts", "-1"], "--aux-facts must be >= 0, got -1.0"),
    (["--canvas-from", "1"], r"--canvas-from must be in \[0, 0.999\], got 1.0"),
    (["--steps", "0", "--epochs", "0"], "--epochs must be positive when --steps is 0, got 0.0"),
    (["--slices-per-step", "6", "--micro-batch", "4"], "--slices-per-step 6 must be a multiple of --micro-batch 4"),
    (["--format", "paper"], "--canvas, --recap, --compose and --aux-facts are pieces of the compact format: add "
                            "--no-canvas --no-recap --no-compose --aux-facts 0 for --format paper"),
    (["--no-canvas"], "--compose embeds a state by its canvas row and column: add --canvas, or --no-compose"),
    (["--model-dir", "x"], "--model-dir is for the IA3 presets"),
    (["--preset", "llama3.1-8b"], "preset llama3.1-8b needs --model-dir"),
    (["--preset", "smollm2", "--format", "compact"], "--format compact needs the cpu preset's own vocabulary"),
    (["--out", "FILE"], "--out FILE is a file: give a directory"),
    (["--targets", "mc"], "unrecognized arguments: --targets mc"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, error):
    monkeypatch.chdir(tmp_path)  # the default --out and --data-dir would be here
    Path("FILE").write_text("not a dir")
    with pytest.raises(SystemExit) as e:
        train.parse_args(args)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines: the error, one line
    assert re.fullmatch(r"\S+: error: .*", last) and re.search(error, last), last
    assert sorted(os.listdir(tmp_path)) == ["FILE"]  # nothing generated


def test_check_config_and_the_base_model_positions(tmp_path):
    with pytest.raises(ValueError, match=r"--grad-clip must be >= 0, got -1.0"):
        train.check_config(train.make_config("cpu", grad_clip=-1.0))
    with pytest.raises(ValueError, match=r"--gamma must be in \[0, 1\], got 1.5"):
        train.check_config(train.make_config("cpu", gamma=1.5))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train.check_config(train.make_config("smollm2", model_dir=str(tmp_path)))
    base = policy.small_model(train.make_config("cpu", dim=32, n_layers=1, context_len=512), 300)
    llama.save(base, tmp_path / "base")
    train.check_config(train.make_config("smollm2", model_dir=str(tmp_path / "base"), context_len=512))
    with pytest.raises(ValueError, match="--context-len 513 is longer than the base model's positions"):
        train.check_config(train.make_config("smollm2", model_dir=str(tmp_path / "base"), context_len=513))


# ---------------------------------------------------------------------------------------------------- signals

def test_ctrl_c_finishes_the_step_saves_and_exits_non_zero(tmp_path, monkeypatch):
    calls, collate = [0], dqn.collate

    def ctrl_c(*a, **kw):
        calls[0] += 1
        if calls[0] == 2 + 1:  # the real signal, in step 1 (after the 2 held-out slices of step 0)
            os.kill(os.getpid(), signal.SIGINT)
        return collate(*a, **kw)
    monkeypatch.setattr(dqn, "collate", ctrl_c)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = tiny(tmp_path, steps=50)
    with pytest.raises(SystemExit) as e:
        train.main(argv(cfg))
    run = Path(cfg.out)
    assert e.value.code == (f"train.py: interrupted (SIGINT): saved step 1 in {run}/checkpoints/step_000001; "
                            f"continue with --resume --out {run}")  # a string: exit status 1
    assert (run / "latest").read_text() == "checkpoints/step_000001"
    assert torch.load(run / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=False)["step"] == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert (run / "loss.png").exists()


@pytest.mark.slow
def test_sigterm_saves_the_step_and_exits_non_zero(tmp_path):
    """A real SIGTERM to `train.py` that is still training: it finishes the step, saves it, exits with status 1."""
    cfg = tiny(tmp_path, steps=100_000, save_every=0, eval_every=0)
    run = Path(cfg.out)
    proc = subprocess.Popen([sys.executable, str(small_train_script(tmp_path))] + argv(cfg), cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and '"loss"' in (run / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    last = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert 1 <= last < 100_000
    assert f"train.py: interrupted (SIGTERM): saved step {last} in {run}/checkpoints/step_{last:06d}" in err
    assert (run / "latest").read_text() == f"checkpoints/step_{last:06d}"
    state = torch.load(run / "checkpoints" / f"step_{last:06d}" / "trainer_state.pt", weights_only=False)
    assert state["step"] == last
    assert checkpoint.resume_point(run, policy.needed_files(cfg)) == run / "checkpoints" / f"step_{last:06d}"


def test_the_base_model_fingerprint_is_the_same_in_fp32_and_bf16_and_tells_weights_apart(tmp_path):
    """A run trained on a GPU (bf16 weights) is evaluated on a CPU (fp32): the same file loaded both ways has one
    fingerprint, also where its fp32 values are not bf16 numbers; a change in a hashed row changes it."""
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64,
                                              max_seq_len=64))
    llama.save(model, tmp_path / "fp32")
    fp32, bf16 = llama.load(tmp_path / "fp32"), llama.load(tmp_path / "fp32", dtype=torch.bfloat16)
    assert fp32.tok_embeddings.weight.dtype == torch.float32 and bf16.tok_embeddings.weight.dtype == torch.bfloat16
    assert not torch.equal(fp32.tok_embeddings.weight, bf16.tok_embeddings.weight.float())  # rounded on loading
    assert checkpoint.weights_fingerprint(fp32) == checkpoint.weights_fingerprint(bf16)
    with torch.no_grad():
        fp32.layers[1].feed_forward.w2.weight[2, 5] += 0.05  # beyond bf16's rounding of it
    assert checkpoint.weights_fingerprint(fp32) != checkpoint.weights_fingerprint(bf16)
