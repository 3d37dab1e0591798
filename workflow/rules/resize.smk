# Short side to resize.short_side, every image re-encoded as an RGB baseline JPEG; rejects listed.
rule resize:
    input:
        extracted=WORK / "extracted",
        code=sources("resize"),
    output:
        directory(WORK / "resized"),
    # A log, not an output: snakemake keeps it when the job fails (too many rejects), so the list
    # of unusable files survives for the user to read.
    log:
        rejected=WORK / "rejected.tsv",
    params:
        resize=config["resize"],
    threads: workflow.cores
    shell:
        "{PY} -m tools.resize --src {input.extracted} --dst {output} --rejected {log.rejected}"
        " --short-side {params.resize[short_side]} --quality {params.resize[quality]}"
        " --max-rejected-fraction {params.resize[max_rejected_fraction]} --workers {threads}"
