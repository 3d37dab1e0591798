# Unpack the train archive (one inner tar per class) and the val archive, arranging val by labels.
extracted = directory(WORK / "extracted")


rule extract:
    input:
        train_tar=raw_archive("ILSVRC2012_img_train.tar"),
        val_tar=raw_archive("ILSVRC2012_img_val.tar"),
        labels=config["val_labels"],
        code=sources("extract"),
    output:
        extracted if config["extract"]["keep_originals"] else temp(extracted),
    params:
        expect=config["extract"]["expect"],
        devkit=f"--devkit {config['devkit']}" if config.get("devkit") else "",
    threads: workflow.cores
    shell:
        "{PY} -m tools.extract --raw-dir {RAW} --val-labels {input.labels} --out {output}"
        " --workers {threads} --expect {params.expect} {params.devkit}"
