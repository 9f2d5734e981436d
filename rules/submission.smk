# The challenge zip and, when query labels are configured, the challenge metric.


rule make_submission:
    input:
        predictions=final_predictions(),
        queries="results/converted/split",
    output:
        "results/submission.zip",
    log:
        "results/logs/make_submission.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        max_class=max(CFG["classes"]["novel"] + CFG["classes"]["base"]),
        code=CODE["submission"],
    script:
        "../workflow_scripts/make_submission.py"


rule evaluate:
    input:
        predictions=final_predictions(),
        queries="results/converted/split",
        truth=query_labels_input(),
    output:
        json="results/metrics.json",
        table=report(
            "results/metrics.tsv", caption="../report/metrics.rst", category="Metrics"
        ),
    log:
        "results/logs/evaluate.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings=fc.evaluation_settings(CFG),
        truth=fc.query_labels_dir(CFG),
        code=CODE["submission"],
    script:
        "../workflow_scripts/evaluate.py"


rule compare_prompts:
    input:
        learned=learned_predictions(),
        pairs=pair_predictions(),
        queries="results/converted/split",
        truth=query_labels_input(),
    output:
        json="results/ablation/prompts.json",
        table=report(
            "results/ablation/prompts.tsv",
            caption="../report/ablation.rst",
            category="Metrics",
        ),
    log:
        "results/logs/compare_prompts.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings=fc.evaluation_settings(CFG),
        truth=fc.query_labels_dir(CFG),
        code=CODE["submission"],
    script:
        "../workflow_scripts/compare_prompts.py"


rule job_statistics:
    input:
        benchmark_files(),
    output:
        report(
            "results/job_statistics.tsv",
            caption="../report/job_statistics.rst",
            category="Jobs",
        ),
    log:
        "results/logs/job_statistics.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        code=CODE["submission"],
    script:
        "../workflow_scripts/job_statistics.py"
