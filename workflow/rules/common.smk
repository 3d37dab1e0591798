# Helpers shared by the rules: paths, tool sources (listed as inputs so that editing a tool reruns
# its stage and everything after it), and the check for the raw archives.
import json
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def typed_leaves(value):
    """`--config resize='{short_side: 128}'` arrives with string leaves ('128'): read them as YAML
    scalars, so nested overrides on the command line validate like the config file."""
    if isinstance(value, dict):
        return {k: typed_leaves(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (bool, int, float)) else value
    return value


for _key, _value in list(config.items()):
    if isinstance(_value, dict):
        config[_key] = typed_leaves(_value)
validate(config, "../schemas/config.schema.yaml")

RAW = Path(config["raw_dir"])
WORK = Path(config["work_dir"])
MODELS = ["alexnet", "overfeat"]
# The interpreter that runs snakemake runs the tools too, so one environment serves both.
PY = sys.executable
MINI = config.get("mini", {}).get("classes", 0) > 0

def sources(module):
    """Source files of tools.<module> and of every tools.* module it imports, directly or not, so
    that editing any of them reruns the stage (a tool run from shell: is not tracked as code)."""
    import ast

    files, seen, todo = set(), set(), [f"tools.{module}"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__.py
        path = next((p for p in (Path(*parts).with_suffix(".py"), Path(*parts, "__init__.py")) if p.exists()), None)
        if path is None:  # a name imported from a module, not a module
            continue
        files.add(str(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("tools")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tools"):
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return sorted(files)


def raw_archive(name):
    """Input function for a raw archive: a clear error before any job runs when it is missing."""
    path = RAW / name

    def find(wildcards):
        if not MINI and not path.exists():
            raise WorkflowError(
                f"Missing raw archive {name}: put it into {RAW.resolve()}/ (config key raw_dir), "
                f"as downloaded from https://image-net.org/challenges/LSVRC/2012/, "
                f"or set mini.classes > 0 to generate a mini dataset there.")
        return ancient(path)

    return find


def flag_args(settings, skip=()):
    """Turn a settings dict into tool flags: key_name: value -> --key-name value; true -> --key-name."""
    args = []
    for key, value in sorted(settings.items()):
        if key in skip:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            continue
        else:
            args += [flag, str(value)]
    return " ".join(args)


def show_results(models):
    """After a successful run, say where each trained model stands and where its curves are."""
    for model in models:
        run_dir = WORK / "runs" / model
        final, evaluation = run_dir / "final.json", run_dir / "eval.json"
        if not final.exists():
            continue
        f = json.loads(final.read_text())
        line = (f"{model}: epoch {f['epoch']}, val top-1 error {f['val_top1_err']:.2f}%, "
                f"top-5 error {f['val_top5_err']:.2f}%; curves: {run_dir / 'curves.png'}")
        if evaluation.exists():
            e = json.loads(evaluation.read_text())
            line += f"; evaluated: top-1 {e['top1_error']:.2f}%, top-5 {e['top5_error']:.2f}% ({evaluation})"
        print(line)
