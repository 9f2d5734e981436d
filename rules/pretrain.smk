# In-context pretraining on synthetic scenes (fewseg/pretrain.py): its own target, `snakemake --cores 2 pretrain`,
# never part of `all`. Set model.weights to results/pretrain/model.pt to fine-tune from the result.


rule pretrain:
    input:
        start=pretraining_start(),
    output:
        model="results/pretrain/model.pt",
        history="results/pretrain/history.csv",
        plot="results/pretrain/history.png",
    log:
        "results/logs/pretrain.log",
    benchmark:
        "results/benchmarks/pretrain.tsv"
    conda:
        "../envs/fewseg.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=1440,
        gpu=1 if CFG["runtime"]["device"] == "cuda" else 0,
    params:
        settings=lambda wildcards: fc.pretraining_settings(CFG),
        checkpoint_dir="results/checkpoints/pretrain",
        code=CODE["pretrain"],
    script:
        "../workflow_scripts/pretrain.py"
