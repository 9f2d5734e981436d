# Dataset stages (SPEC section 2): the demo dataset, train colour masks, support split and query list.


rule make_demo_dataset:
    output:
        directory(fc.DEMO_ROOT),
    params:
        demo=CFG["demo"],
        seed=CFG["seed"],
        code=CODE["demo"],
    log:
        "results/logs/make_demo_dataset.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/fewseg.yaml"
    script:
        "../workflow_scripts/make_demo_dataset.py"


rule convert_train_masks:
    input:
        root=dataset_root(),
    output:
        directory("results/converted/train"),
    params:
        dataset=conversion_settings(),
        palette=CFG["classes"]["palette"],
        base=CFG["classes"]["base"],
        code=CODE["convert"],
    log:
        "results/logs/convert_train_masks.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/fewseg.yaml"
    script:
        "../workflow_scripts/convert_train_masks.py"


rule split_support:
    input:
        root=dataset_root(),
        train="results/converted/train",
    output:
        directory("results/converted/split"),
    params:
        dataset=split_settings(),
        novel=CFG["classes"]["novel"],
        code=CODE["convert"],
    log:
        "results/logs/split_support.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/fewseg.yaml"
    script:
        "../workflow_scripts/split_support.py"
