# Helpers shared by the rules: paths, tool sources (listed as inputs so that editing a tool reruns
# its stage and everything after it), and the check for the raw archives.
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

# Shared modules imported by every stage tool.
COMMON_SOURCES = ["tools/__init__.py", "tools/imagenet/__init__.py", "tools/imagenet/fsutil.py",
                  "tools/imagenet/classes.py"]


def sources(*modules):
    """Source files of tools.<module> for each module, plus the shared modules they all import."""
    return [f"tools/{m.replace('.', '/')}.py" for m in modules] + COMMON_SOURCES


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
