"""The package's layers, as data: a module imports only from its own floor or below (at module level and inside
functions), and nothing below the hosts imports Lightning. Fails on an upward edge, naming it."""

import ast
from pathlib import Path

import xattn_lightning

#: floor of each top-level part of the package (maths and data at the bottom, the hosts and tools on top)
FLOORS = {
    "errors": 0, "text": 0, "audio": 0, "functional": 0, "batches": 0,
    "adapters": 1, "encoder_cache": 1,
    "saliency": 2, "testing": 2,
    "explain": 3, "scores": 3, "summary": 3, "faithfulness": 3, "reading": 3, "viz": 3, "loading": 3,
    "timestamps": 4, "compare_report": 4,
    "monitoring": 5,
    "_lightning": 6, "checkpoints": 6, "callbacks": 6, "integrations": 6, "loggers": 6, "compare": 6, "demo": 6,
    "cli": 7, "__main__": 7, "__init__": 7,
}  # fmt: skip
HOSTS = 6  # from this floor up, Lightning may be imported
ROOT = Path(xattn_lightning.__file__).parent


def _edges():
    for path in ROOT.rglob("*.py"):
        part = path.relative_to(ROOT).parts[0].removesuffix(".py")
        tree = ast.parse(path.read_text())
        guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                yield part, name, f"{path.relative_to(ROOT.parent)}:{node.lineno}"


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for part, name, where in _edges():
        if name.startswith("xattn_lightning."):
            target = name.split(".")[1]
            if FLOORS[target] > FLOORS[part]:
                upward.append(f"{where}: {part} (floor {FLOORS[part]}) imports {name} (floor {FLOORS[target]})")
        elif name == "xattn_lightning" and part != "__init__":
            upward.append(f"{where}: {part} imports the package root")
    assert upward == []


def test_lightning_is_imported_only_by_the_hosts():
    below = [where for part, name, where in _edges() if name.split(".")[0] in ("lightning", "pytorch_lightning") and FLOORS[part] < HOSTS]
    assert below == [], below  # fmt: skip


def test_every_part_of_the_package_has_a_floor():
    parts = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert parts - {"__pycache__"} <= set(FLOORS)
