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
        # Evaluate as the run trained: same autocast, memory format and GPU work queues.
        amp=lambda wc: train_settings(wc.model)["amp"],
        channels_last=lambda wc: "--channels-last" if train_settings(wc.model)["channels_last"] else "",
        cuda_connections=lambda wc: train_settings(wc.model)["cuda_connections"],
        ten_crop="--ten-crop" if config["evaluate"].get("ten_crop") else "",
        batch_size=config["evaluate"].get("batch_size", 256),
        workers=config["evaluate"].get("workers", 8),
        decode=config["evaluate"].get("decode", "auto"),
        gpu_decoder=config["evaluate"].get("gpu_decoder", "auto"),
    shell:
        "{PY} -m tools.evaluate --run-dir {params.run_dir} --shards {input.shards} --output {output}"
        " --device {params.device} --batch-size {params.batch_size} --workers {params.workers}"
        " --decode {params.decode} --gpu-decoder {params.gpu_decoder} --amp {params.amp} {params.channels_last} {params.ten_crop}"
        " --cuda-connections {params.cuda_connections}"
