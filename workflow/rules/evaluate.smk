# Top-1/top-5 error of a run's newest checkpoint on the val shards, written beside the run.
rule evaluate:
    input:
        run=WORK / "runs/{model}/final.json",
        shards=WORK / "shards",
        code=sources("evaluate"),
    output:
        WORK / "runs/{model}/eval.json",
    wildcard_constraints:
        model="|".join(MODELS),
    params:
        run_dir=lambda wc: WORK / "runs" / wc.model,
        device=lambda wc: train_settings(wc.model)["device"],
        ten_crop="--ten-crop" if config["evaluate"].get("ten_crop") else "",
        batch_size=config["evaluate"].get("batch_size", 256),
        workers=config["evaluate"].get("workers", 8),
        decode=config["evaluate"].get("decode", "auto"),
    shell:
        "{PY} -m tools.evaluate --run-dir {params.run_dir} --shards {input.shards} --output {output}"
        " --device {params.device} --batch-size {params.batch_size} --workers {params.workers}"
        " --decode {params.decode} {params.ten_crop}"
