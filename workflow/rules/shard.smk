# WebDataset shards (train globally shuffled with a fixed seed) plus manifests with counts and sha256.
rule shard:
    input:
        resized=WORK / "resized",
        code=sources("shard"),
    output:
        directory(WORK / "shards"),
    params:
        shard=config["shard"],
        counts=(config["shard"].get("train_shards", 0), config["shard"].get("val_shards", 0)),
    threads: workflow.cores
    shell:
        "{PY} -m tools.shard --src {input.resized} --out {output}"
        " --train-shard-size {params.shard[train_shard_size]} --val-shard-size {params.shard[val_shard_size]}"
        " --train-shards {params.counts[0]} --val-shards {params.counts[1]}"
        " --seed {params.shard[seed]} --workers {threads}"
