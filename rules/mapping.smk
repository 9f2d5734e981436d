# Prompt selection (method section 3): embed each tile set once, then rank train tiles per query.


rule embed_tiles:
    input:
        tiles=lambda wc: (
            "results/converted/train"
            if wc.subset == "train"
            else "results/converted/split"
        ),
        valid=validated(),
    output:
        "results/mapping/embeddings_{subset}.npz",
    log:
        "results/logs/embed_tiles_{subset}.log",
    benchmark:
        "results/benchmarks/embed_tiles_{subset}.tsv"
    priority: PRIORITY["base_inference"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        settings=fc.mapping_settings(CFG),
        subset="{subset}",
        code=CODE["mapping"],
    script:
        "../workflow_scripts/embed_tiles.py"


rule rank_prompts:
    input:
        train="results/mapping/embeddings_train.npz",
        query="results/mapping/embeddings_query.npz",
        support="results/mapping/embeddings_support.npz",
    output:
        "results/mapping/prompts.json",
    log:
        "results/logs/rank_prompts.log",
    priority: PRIORITY["base_inference"]
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        settings=fc.ranking_settings(CFG),
        code=CODE["mapping"],
    script:
        "../workflow_scripts/rank_prompts.py"
