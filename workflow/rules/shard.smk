# WebDataset shards (train globally shuffled with a fixed seed) plus manifests with counts and sha256.
rule shard:
    input:
        resized=WORK / "resized",
        code=sources("shard"),
    output:
        directory(WORK / "shards"),
    params:
        shard=config["shard"],
    threads: workflow.cores
    shell:
        "{PY} -m tools.shard --src {input.resized} --out {output}"
        " --train-shard-size {params.shard[train_shard_size]} --val-shard-size {params.shard[val_shard_size]}"
        " --seed {params.shard[seed]} --workers {threads}"
