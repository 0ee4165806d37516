"""Issue 24: names are imported from the module that defines them; no re-export façades, no import cycles, and only public
names cross module borders, in `anita/`, the notebooks and the tests. Read from the source (ast), nothing is imported."""
import ast, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAGIC = re.compile(r"^(\s*)[!%].*$", re.M)

def top_defs(tree) -> set:
    "Names a module defines at its top level (functions, classes, assignments, also under `if`/`try`), not imports."
    out = set()
    for n in tree.body:
        for x in ([n] + list(ast.walk(n)) if isinstance(n, (ast.If, ast.Try)) else [n]):
            if isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(x.name)
            elif isinstance(x, ast.Assign):
                out |= {t.id for tg in x.targets for t in ast.walk(tg) if isinstance(t, ast.Name)}
            elif isinstance(x, ast.AnnAssign) and isinstance(x.target, ast.Name): out.add(x.target.id)
    return out

def package_modules(pkg:Path) -> dict:
    "`{module: ast}` of the package's modules (nbdev's `_modidx` left out)."
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(pkg.glob("*.py")) if p.stem != "_modidx"}

def imports_of(tree, pkg:str, here:str=None) -> list:
    "`(module, name, line)` for each `from pkg.module import name` (or `from .module import ...` inside `pkg`), anywhere."
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.ImportFrom) or not n.module: continue
        if n.level == 1 and here is not None: mod = n.module.split(".")[0]
        elif n.level == 0 and n.module.startswith(pkg + "."): mod = n.module.split(".")[1]
        else: continue
        out += [(mod, a.name, n.lineno) for a in n.names]
    return out

def import_problems(sources:dict, mods:dict, pkg:str="anita") -> list:
    """Each import in `sources` (`{where: (ast, module or None)}`) of a name its module does not define (a façade),
    a star import, or a private name from another module."""
    defs, bad = {m: top_defs(t) for m, t in mods.items()}, []
    for where, (tree, here) in sources.items():
        for mod, name, line in imports_of(tree, pkg, here):
            if mod not in mods or mod == here: continue
            if name == "*": bad.append(f"{where}:{line}: star import of {pkg}.{mod}")
            elif name.startswith("_"): bad.append(f"{where}:{line}: private {name} from {pkg}.{mod}")
            elif name not in defs[mod]: bad.append(f"{where}:{line}: {name} is not defined in {pkg}.{mod}")
    return bad

def find_cycle(mods:dict, pkg:str="anita") -> list|None:
    "An import cycle among the package's modules (lazy imports inside functions count too), or None."
    edges = {m: {mod for mod, _, _ in imports_of(t, pkg, m) if mod in mods and mod != m} for m, t in mods.items()}
    state = {}
    def visit(m, path):
        state[m] = "open"
        for w in sorted(edges[m]):
            if state.get(w) == "open": return path[path.index(w):] + [w]
            if w not in state and (c := visit(w, path + [w])): return c
        state[m] = "done"
    for m in sorted(mods):
        if m not in state and (c := visit(m, [m])): return c

def parse_code(src:str):
    return ast.parse(MAGIC.sub(r"\1pass", src))

def project_sources(mods:dict) -> dict:
    "The package's modules, every notebook's code cells, the tests and benchmarks, as `{where: (ast, module or None)}`."
    src = {f"anita/{m}.py": (t, m) for m, t in mods.items()}
    for f in sorted((ROOT/"nbs").glob("*.ipynb")):
        for i, c in enumerate(json.loads(f.read_text(encoding="utf-8"))["cells"]):
            if c["cell_type"] == "code": src[f"{f.name}[{i}]"] = (parse_code("".join(c["source"])), None)
    for f in sorted((ROOT/"tests").rglob("*.py")):
        src[str(f.relative_to(ROOT))] = (ast.parse(f.read_text(encoding="utf-8")), None)
    return src

def test_names_come_from_their_defining_module():
    mods = package_modules(ROOT/"anita")
    assert len(mods) > 30
    assert import_problems(project_sources(mods), mods) == []

def test_no_import_cycle():
    assert find_cycle(package_modules(ROOT/"anita")) is None

def test_the_checks_catch_a_facade_a_private_name_and_a_cycle(tmp_path):
    pkg = tmp_path/"anita"; pkg.mkdir()
    (pkg/"a.py").write_text("from .b import *\nfrom .b import _secret\ndef f(): pass\n")
    (pkg/"b.py").write_text("__all__ = ['g']\ndef g():\n    from .a import f\n    return f\n_secret = 1\n")
    (pkg/"c.py").write_text("from .a import g, f\n")
    mods = package_modules(pkg)
    bad = import_problems({f"{m}.py": (t, m) for m, t in mods.items()}, mods)
    assert any("star import of anita.b" in b for b in bad) and any("private _secret" in b for b in bad)
    assert any("c.py:1: g is not defined in anita.a" in b for b in bad)
    assert not any("f is not defined" in b for b in bad)
    assert find_cycle(mods) in (["a", "b", "a"], ["b", "a", "b"])

def test_notebook_cells_and_strings_of_tests_are_read():
    "The scan sees a façade import in a notebook cell (magics masked) and in a test's subprocess script."
    mods = package_modules(ROOT/"anita")
    cell = parse_code("%time x = 1\nfrom anita.sft import tokenize_lm\n")
    assert import_problems({"cell": (cell, None)}, mods) == ["cell:2: tokenize_lm is not defined in anita.sft"]
    scripts = [s for f in sorted((ROOT/"tests").rglob("*.py"))
               for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and "from anita." in n.value
               for s in [n.value]]
    assert scripts, "no test runs a script that imports anita"
    bad = []
    for i, s in enumerate(scripts):
        try: tree = ast.parse(s.replace("%r", "None"))
        except SyntaxError: continue
        bad += import_problems({f"script{i}": (tree, None)}, mods)
    assert bad == []

def test_module_colon_name_strings_resolve():
    """`"anita.module:name"` strings (entry points, the GPU check's part functions, `STEP_CONFIGS`) name a module that
    defines `name` itself: removing the façades once broke the GPU check's self-test part name this way, which the
    import checks above do not see."""
    mods = package_modules(ROOT/"anita")
    defs = {m: top_defs(t) for m, t in mods.items()}
    files = [*sorted((ROOT/"anita").glob("*.py")), *sorted((ROOT/"nbs").glob("*.ipynb")), *sorted((ROOT/"tests").rglob("*.py")),
             ROOT/"setup.py", ROOT/"settings.ini", *sorted((ROOT/"slurm").glob("*")), ROOT/"Makefile", ROOT/"README.md"]
    refs = {m for f in files if f.is_file() and f.name != "_modidx.py"
            for m in re.findall(r"\banita\.([a-z_]+):([A-Za-z_]\w*)", f.read_text(encoding="utf-8", errors="replace"))}
    assert len(refs) >= 4, refs
    bad = sorted(f"anita.{m}:{n}" for m, n in refs if m in mods and n not in defs[m])
    assert bad == []

def module_aliases(tree, pkg:str="anita") -> dict:
    "`{name: module}` of the names a file binds to a module of `pkg` (`import pkg.m as x`, `from pkg import m`,"
    " `x = pytest.importorskip('pkg.m')`)."
    out = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out.update({a.asname: a.name.split(".")[1] for a in n.names if a.asname and a.name.startswith(pkg + ".")})
        elif isinstance(n, ast.ImportFrom) and n.module == pkg and n.level == 0:
            out.update({a.asname or a.name: a.name for a in n.names})
        elif (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
              and isinstance(n.value, ast.Call) and getattr(n.value.func, "attr", "") == "importorskip" and n.value.args
              and isinstance(n.value.args[0], ast.Constant) and str(n.value.args[0].value).startswith(pkg + ".")):
            out[n.targets[0].id] = n.value.args[0].value.split(".")[1]
    return out

def test_module_attributes_are_defined_there():
    "`x.name` on a module alias in the tests and notebooks names something that module defines (not one it imports)."
    mods = package_modules(ROOT/"anita")
    defs = {m: top_defs(t) for m, t in mods.items()}
    bad = []
    for where, (tree, here) in project_sources(mods).items():
        if here is not None: continue
        alias = module_aliases(tree)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and alias.get(n.value.id) in defs:
                m = alias[n.value.id]
                if n.attr not in defs[m] and not n.attr.startswith("__"): bad.append(f"{where}: {n.value.id}.{n.attr} (anita.{m})")
    assert sorted(set(bad)) == []
