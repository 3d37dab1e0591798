"""ImageNet pipeline: raw ILSVRC2012 archives -> extract -> resize -> shard -> train -> evaluate.

    snakemake --cores 16 train_alexnet
    snakemake --cores 2 train_alexnet --configfile workflow/mini.yaml    # built-in mini dataset

Targets: prepare (all shards), train_alexnet, train_overfeat, evaluate_alexnet, evaluate_overfeat, all.
Settings: config.yaml (validated against workflow/schemas/config.schema.yaml); rules: workflow/rules/.
"""
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"  # validates the config first
include: "workflow/rules/mini.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/resize.smk"
include: "workflow/rules/shard.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


localrules: all, prepare, train_alexnet, train_overfeat, evaluate_alexnet, evaluate_overfeat


rule all:
    input:
        expand(WORK / "runs/{model}/eval.json", model=MODELS),


rule prepare:
    input:
        WORK / "shards",


rule train_alexnet:
    input:
        WORK / "runs/alexnet/final.json",


rule train_overfeat:
    input:
        WORK / "runs/overfeat/final.json",


rule evaluate_alexnet:
    input:
        WORK / "runs/alexnet/eval.json",


rule evaluate_overfeat:
    input:
        WORK / "runs/overfeat/eval.json",


onsuccess:
    show_results(MODELS)
