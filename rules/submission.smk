# The challenge zip and, when query labels are configured, the challenge metric.


rule make_submission:
    input:
        predictions=final_predictions(),
        queries="results/converted/split",
    output:
        "results/submission.zip",
    params:
        max_class=max(CFG["classes"]["novel"] + CFG["classes"]["base"]),
        code=CODE["submission"],
    log:
        "results/logs/make_submission.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/fewseg.yaml"
    script:
        "../workflow_scripts/make_submission.py"


rule evaluate:
    input:
        predictions=final_predictions(),
        queries="results/converted/split",
        truth=fc.query_labels_dir(CFG) or [],
    output:
        report("results/metrics.json", caption="../report/metrics.rst", category="Metrics"),
    params:
        settings=fc.evaluation_settings(CFG),
        code=CODE["submission"],
    log:
        "results/logs/evaluate.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/fewseg.yaml"
    script:
        "../workflow_scripts/evaluate.py"
