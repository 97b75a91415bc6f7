"""The shape of the repository (the layout issue's rules), read from the source: the root holds the design card's
modules and at most six more; imports go one way (models <- diff2flow <- sd / lora <- tasks <- programs, toy/ and
bench/ on top) with no cycle and no project module imported inside a function; no function is over 60 lines; train.py stays a
script of at most 400 lines. And the programs' conventions: exit status 2 for a usage error, 1 for a failure."""
import ast
import os
import warnings

import pytest

import common
import depth
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN_CARD = {"unet", "vae", "clip_text", "lora", "diff2flow", "train", "sample", "depth"}
LEVELS = {  # a module may import only modules of a lower level
    "common": 0, "unet": 1, "vae": 1, "clip_text": 1, "cpu_fast": 2, "diff2flow": 2, "diffusers_format": 2,
    "lora": 3, "sd": 4, "data": 5, "reflow": 6, "depth": 6, "train": 7, "sample": 7,
}


def sources(folder):
    d = os.path.join(ROOT, folder)
    return {f[:-3]: os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".py")}


def imports(path, top_level_only=False):
    """Names of the modules `path` imports (the last component), at module level or anywhere."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[-1] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module.split(".")[-1])
    return out


def test_root_holds_the_design_card_and_at_most_six_more():
    root = set(sources("."))
    assert DESIGN_CARD <= root and len(root - DESIGN_CARD) <= 6, sorted(root - DESIGN_CARD)
    assert root == set(LEVELS), "a new root module needs its place in LEVELS (the dependency order)"


def test_dependencies_go_one_way_and_toy_and_bench_are_on_top():
    root = sources(".")
    toy_bench = set(sources("toy")) | set(sources("bench"))
    for name, path in root.items():
        deps = imports(path)
        assert not deps & toy_bench, f"{name}.py imports toy/ or bench/ modules {deps & toy_bench}"
        upward = {d for d in deps & set(LEVELS) - {name} if LEVELS[d] >= LEVELS[name]}
        assert not upward, f"{name}.py imports {upward}, not below it in the dependency order"


def test_no_project_module_imported_inside_a_function():
    """Such an import hides a dependency (or dodges a cycle); optional packages (diffusers in bench/) may be."""
    ours = set(sources(".")) | set(sources("toy")) | set(sources("bench"))
    for folder in (".", "toy", "bench"):
        for name, path in sources(folder).items():
            hidden = (imports(path) - imports(path, top_level_only=True)) & ours
            assert not hidden, f"{folder}/{name}.py imports {hidden} inside a function"


def test_no_function_over_60_lines_and_train_py_at_most_400():
    long = []
    for folder in (".", "toy", "bench"):
        for name, path in sources(folder).items():
            for n in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                    long.append(f"{folder}/{name}.py:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long
    assert sum(1 for _ in open(os.path.join(ROOT, "train.py"))) <= 400


@pytest.mark.parametrize("main, argv, status", [
    (train.main, ["--steps", "0"], 2),  # usage errors: arguments
    (sample.main, ["--prompt", "x", "--n", "0"], 2),
    (depth.main, ["x.png", "--steps", "0"], 2),
    (train.main, ["--ckpt", "/nonexistent/model.safetensors", "--data", "/nonexistent", "--out", "OUT"], 1),
    (sample.main, ["--ckpt", "/nonexistent/model.safetensors", "--prompt", "x"], 1),  # failures: files, data
    (depth.main, ["x.png", "--ckpt", "/nonexistent/model.safetensors"], 1),
], ids=["train-usage", "sample-usage", "depth-usage", "train-failure", "sample-failure", "depth-failure"])
def test_exit_status_2_for_usage_errors_and_1_for_failures(main, argv, status, tmp_path, capsys):
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == status and len(err) == 1 and ": error: " in err[0], (e.value.code, err)


def test_warnings_are_one_line(capsys):
    common.one_line_warnings()
    warnings.warn("something to know")
    err = capsys.readouterr().err
    assert err.endswith(": warning: something to know\n") and err.count("\n") == 1
