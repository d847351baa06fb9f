"""engine/'s house rules, read off the imports: commands at the root, parts in five drawers, each drawer
importing only from the drawers above it (engine/__init__.py's order), no library file importing a
command, and no import circle anywhere in the package."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.path.join(ROOT, "engine")
DRAWERS = ("model", "weights", "training", "rl", "eval")  # lower first
COMMANDS = {"sft", "rm", "dpo", "ppo", "evaluate", "check", "merge", "generate_text", "demo", "flags"}


def engine_imports() -> dict[str, set[str]]:
    """{module: the rlhf_engine.engine modules it imports}, names relative to engine/ ('rl.rollout')."""
    graph = {}
    for folder, _, files in os.walk(ENGINE):
        for name in files:
            if not name.endswith(".py") or name == "__init__.py":
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ENGINE)[:-3].replace(os.sep, ".")
            found = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_engine.engine"):
                    base = node.module[len("rlhf_engine.engine"):].lstrip(".")
                    for alias in node.names:  # `from rlhf_engine.engine.rl import checkpoint` names a module
                        candidate = f"{base}.{alias.name}" if base else alias.name
                        found.add(candidate if os.path.exists(os.path.join(ENGINE, *candidate.split(".")) + ".py")
                                  else base)
                elif isinstance(node, ast.Import):
                    found |= {a.name[len("rlhf_engine.engine."):] for a in node.names
                              if a.name.startswith("rlhf_engine.engine.")}
            graph[module] = found - {""}
    return graph


def test_the_root_holds_exactly_the_commands_and_the_drawers():
    entries = {e[:-3] if e.endswith(".py") else e for e in os.listdir(ENGINE) if e != "__pycache__"}
    assert entries == COMMANDS | set(DRAWERS) | {"__init__"}


def test_drawers_import_only_drawers_above_them_and_never_a_command():
    bad = []
    for module, imports in engine_imports().items():
        if "." not in module:
            continue  # a command may import anything
        level = DRAWERS.index(module.split(".")[0])
        for target in imports:
            top = target.split(".")[0]
            if top in COMMANDS or (top in DRAWERS and DRAWERS.index(top) > level):
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_no_import_circle():
    graph = engine_imports()
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for target in graph.get(node, ()):
            visit(target, path + [node])
        state[node] = "done"

    for module in graph:
        visit(module, [])
