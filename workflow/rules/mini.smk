# The built-in mini ImageNet (same archive layout as the real one) for the demo and the tests:
# only active when mini.classes > 0, and then it provides the raw archives of raw_dir.
if MINI:

    rule make_mini:
        input:
            sources("make_mini"),
        output:
            RAW / "ILSVRC2012_img_train.tar",
            RAW / "ILSVRC2012_img_val.tar",
            RAW / "val_labels.csv",
        params:
            mini=config["mini"],
            quirks="--quirks" if config["mini"].get("quirks", True) else "",
            min_side=config["mini"].get("min_side", 80),
            max_side=config["mini"].get("max_side", 400),
            noise=config["mini"].get("noise", 8),
        threads: workflow.cores
        shell:
            "{PY} -m tools.make_mini --out {RAW} --workers {threads} --classes {params.mini[classes]}"
            " --train-per-class {params.mini[train_per_class]} --val-per-class {params.mini[val_per_class]}"
            " --seed {params.mini[seed]} --min-side {params.min_side} --max-side {params.max_side}"
            " --noise {params.noise} {params.quirks}"
