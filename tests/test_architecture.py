"""The layering rule, checked on the source: imports point down only and never in a circle, counting imports
inside functions; no tab imports another tab; the stage table matches the config's stage names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASIC = {"config", "hardware", "paths", "models", "data", "preference", "recipe", "estimate", "attention",
         "lm_head", "metrics", "run_folder", "noise", "data_files", "lora_init", "access", "storage", "distributed",
         "course_progress"}
SERVICES = {"runs", "chat", "feedback", "evaluate", "quantize", "export", "gguf_export", "compare", "deploy",
            "scoring", "benchmarks", "adapter_inspect", "sweeps", "course", "lab_report"}


def layer(module: str) -> int:
    """0 basic modules, 1 stages, 2 the training entry point, 3 app services, 4 the screen (app and components)."""
    parts = module.split(".")
    if parts[0] in ("app", "components"):
        return 4
    if parts[:2] == ["finetune", "stages"]:
        return 1
    name = parts[1] if len(parts) > 1 else ""
    if name == "train":
        return 2
    if name in SERVICES:
        return 3
    assert name in BASIC or name == "", f"{module}: put it in a layer (BASIC or SERVICES in this test)"
    return 0


def project_imports() -> dict[str, set[str]]:
    files = [ROOT / "app.py", *sorted((ROOT / "finetune").rglob("*.py")), *sorted((ROOT / "components").rglob("*.py"))]
    names = {f: ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in files}
    known = set(names.values())
    edges: dict[str, set[str]] = {}
    for file, module in names.items():
        edges[module] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module, *(f"{node.module}.{a.name}" for a in node.names)] \
                if isinstance(node, ast.ImportFrom) and node.module else []
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges[module].add(target)
    return edges


def test_imports_point_down_and_tabs_do_not_import_tabs():
    edges = project_imports()
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
              if layer(b) > layer(a) and b != "finetune"]
    tab_to_tab = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if a.endswith("_tab") and b.endswith("_tab")]
    assert not upward, f"upward imports: {upward}"
    assert not tab_to_tab, f"tabs importing tabs: {tab_to_tab}"


def test_no_import_cycles():
    edges = project_imports()
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            walk(target, path + [module])
        done.add(module)

    for module in sorted(edges):
        walk(module, [])


def test_the_stage_table_matches_the_config():
    from finetune.config import STAGES as CONFIG_STAGES
    from finetune.stages.runner import STAGES

    assert set(STAGES) == set(CONFIG_STAGES)
    for name, stage in STAGES.items():
        assert callable(stage.build) and callable(stage.save), name
