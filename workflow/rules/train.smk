# Data-parallel training with torchrun: one process per GPU (train.gpus), settings from the `train`
# section overridden by the model's own section (alexnet, overfeat).


def train_settings(model):
    return {**config["train"], **config[model]}


rule train:
    input:
        shards=WORK / "shards",
        code=sources("train"),
    output:
        WORK / "runs/{model}/final.json",
    wildcard_constraints:
        model="|".join(MODELS),
    params:
        settings=lambda wc: train_settings(wc.model),
        flags=lambda wc: flag_args(train_settings(wc.model), skip=("gpus",)),
        run_dir=lambda wc: WORK / "runs" / wc.model,
        resize_size=config["resize"]["short_side"],
    threads: workflow.cores
    # A rerun means settings, code or data changed: start the run afresh rather than resume stale
    # checkpoints (resume a preempted run with `python -m tools.train ... --resume`, see README).
    shell:
        "rm -rf {params.run_dir} && "
        "{PY} -m torch.distributed.run --standalone --nproc-per-node {params.settings[gpus]}"
        " -m tools.train --shards {input.shards} --out {params.run_dir}"
        " --resize-size {params.resize_size} {params.flags}"
