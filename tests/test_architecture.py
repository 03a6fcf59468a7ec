"""The house rules of docs/architecture.md, checked: packages are floors, an import only goes down (lazy imports
inside functions included), no circles; checkpoints written before the packages moved still load."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lit_factor"
FIXTURE = REPO / "tests" / "fixtures" / "staged_lowrank_tiny_bert.ckpt"

#: floor of each module of lit_factor (by its dotted prefix; the longest prefix decides)
FLOORS = {
    "lit_factor.errors": 0, "lit_factor.models": 0, "lit_factor.hardware": 0,
    "lit_factor.factorize": 1,
    "lit_factor.compress": 2,
    "lit_factor.train": 3,
    "lit_factor.deploy": 4,
    "lit_factor.study": 5,
    "lit_factor.cli": 6, "lit_factor.callbacks": 6, "lit_factor.__main__": 6, "lit_factor": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[prefix]


def imports(path: Path) -> set[str]:
    """Every lit_factor module ``path`` imports, at the top or inside a function (relative imports resolved)."""
    found = set()
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lit_factor"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("lit_factor"):
                # "from lit_factor.deploy import ort" imports the module lit_factor.deploy.ort
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                              or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_goes_down_a_floor_or_stays_on_it():
    up = [f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
          for m, deps in graph().items() for d in sorted(deps) if floor(d) > floor(m)]
    assert not up, "\n".join(up)


def test_no_circles_between_modules():
    edges = graph()
    state: dict[str, int] = defaultdict(int)  # 0 unseen, 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if d in edges and state[d] == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d in edges and state[d] == 0:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in edges:
        if state[m] == 0:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_rule_checker_sees_an_arrow_up_and_a_lazy_one(tmp_path, monkeypatch):
    """The checker itself can fail: a lazy import inside a function is found and its floor compared."""
    path = PACKAGE / "compress" / "surgery.py"
    source = path.read_text() + "\n\ndef _late():\n    from lit_factor.train.module import FactorizedClassifier\n"
    fake = tmp_path / "surgery.py"
    fake.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "module_name", lambda p: "lit_factor.compress.surgery")
    assert "lit_factor.train.module" in imports(fake)
    assert floor("lit_factor.train.module") > floor("lit_factor.compress.surgery")


def test_a_checkpoint_written_before_the_move_loads_and_predicts_the_same():
    """A mid-staging low-rank checkpoint written by the flat-layout code (session 6): its plan rebuilds the
    switchable architecture and the logits on a fixed batch are those it gave then."""
    from lit_factor.train.module import FactorizedClassifier

    expected = torch.load(FIXTURE.with_suffix(".expected.pt"), weights_only=True)
    module = FactorizedClassifier.load_from_checkpoint(FIXTURE, map_location="cpu").eval()
    assert module.staged and sum(bool(v) for k, v in module.state_dict().items() if k.endswith("switched")) == 6
    ids = expected["input_ids"]
    with torch.no_grad():
        logits = module({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_written_before_the_move_validates_from_the_cli(tmp_path, glue_writer, monkeypatch):
    from lit_factor import cli

    monkeypatch.chdir(tmp_path)
    root = glue_writer("SST-2")
    run = cli.main(["validate", "--ckpt_path", str(FIXTURE), "--data.data_dir", str(root),
                    "--data.max_seq_length", "16", "--trainer.enable_progress_bar", "false",
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert run.model.staged and run.trainer.callback_metrics["val/accuracy"] >= 0
