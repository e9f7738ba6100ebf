"""The layering rule, checked on the source: each module of finetune/ sits in the folder of its layer, imports
point down only and never in a circle, counting imports inside functions; no tab imports another tab; the stage
table matches the config's stage names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folders of finetune/, lowest layer first; the train entry point sits between the stages and the services.
LAYERS = {"core": 0, "stages": 1, "services": 3}
ENTRY_POINT = "finetune.train"


def layer(module: str) -> int:
    """0 basic modules (finetune/core), 1 stages (finetune/stages), 2 the training entry point (finetune/train.py),
    3 app services (finetune/services), 4 the screen (app and components)."""
    parts = module.split(".")
    if parts[0] in ("app", "components"):
        return 4
    if module == ENTRY_POINT:
        return 2
    if module == "finetune":
        return 0
    assert parts[1] in LAYERS, f"{module}: put it in a layer's folder (finetune/{'|'.join(LAYERS)}/)"
    return LAYERS[parts[1]]


def test_every_module_of_finetune_sits_in_a_layer_folder():
    loose = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "finetune").rglob("*.py"))
             if f.relative_to(ROOT / "finetune").parts[0] not in LAYERS and f.name not in ("train.py", "__init__.py")]
    nested = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "finetune").glob("*/*/*.py"))]
    assert not loose, f"modules outside finetune/{{{','.join(LAYERS)}}}/: {loose}"
    assert not nested, f"one folder per layer, no deeper: {nested}"
    for folder in LAYERS:
        assert (ROOT / "finetune" / folder / "__init__.py").is_file(), f"finetune/{folder}/__init__.py is missing"


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
    from finetune.core.config import STAGES as CONFIG_STAGES
    from finetune.stages.runner import STAGES

    assert set(STAGES) == set(CONFIG_STAGES)
    for name, stage in STAGES.items():
        assert callable(stage.build) and callable(stage.save), name


TAB_LINES, MODULE_LINES = 450, 600


def test_files_stay_readable_in_one_sitting():
    """A tab file holds layout and wiring (its handlers live beside what they serve): at most TAB_LINES lines. A
    module past MODULE_LINES says on its first line why it stays one ("Over 600 lines on purpose: ...")."""
    tabs = {f.name: n for f in sorted((ROOT / "components").glob("*_tab.py"))
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > TAB_LINES}
    assert not tabs, f"tab files over {TAB_LINES} lines: {tabs}"
    files = [ROOT / "app.py", *sorted((ROOT / "finetune").rglob("*.py")), *sorted((ROOT / "components").glob("*.py"))]
    unexplained = [str(f.relative_to(ROOT)) for f in files
                   if len(lines := f.read_text(encoding="utf-8").splitlines()) > MODULE_LINES
                   and not lines[0].startswith(f"# Over {MODULE_LINES} lines on purpose: ")]
    assert not unexplained, f"modules over {MODULE_LINES} lines without the reason on their first line: {unexplained}"
