# Short side to resize.short_side, every image re-encoded as an RGB baseline JPEG; rejects listed.
rule resize:
    input:
        extracted=WORK / "extracted",
        code=sources("resize"),
    output:
        resized=directory(WORK / "resized"),
        rejected=WORK / "rejected.tsv",
    params:
        resize=config["resize"],
    threads: workflow.cores
    shell:
        "{PY} -m tools.resize --src {input.extracted} --dst {output.resized} --rejected {output.rejected}"
        " --short-side {params.resize[short_side]} --quality {params.resize[quality]}"
        " --max-rejected-fraction {params.resize[max_rejected_fraction]} --workers {threads}"
