# Dataset stages (method section 2): the demo dataset, train colour masks, support split and query list.


rule make_demo_dataset:
    output:
        directory(fc.DEMO_ROOT),
    log:
        "results/logs/make_demo_dataset.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        demo=CFG["demo"],
        seed=CFG["seed"],
        code=CODE["demo"],
    script:
        "../workflow_scripts/make_demo_dataset.py"


rule validate_dataset:
    input:
        root=dataset_root(),
    output:
        VALIDATED,
    log:
        "results/logs/validate_dataset.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dataset=validation_settings(),
        base=CFG["classes"]["base"],
        novel=CFG["classes"]["novel"],
        cache="results/cache/validation.json",
        max_listed=20,
        code=CODE["validate"],
    script:
        "../workflow_scripts/validate_dataset.py"


rule convert_train_masks:
    input:
        root=dataset_root(),
        valid=validated(),
    output:
        directory("results/converted/train"),
    log:
        "results/logs/convert_train_masks.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dataset=conversion_settings(),
        palette=CFG["classes"]["palette"],
        base=CFG["classes"]["base"],
        code=CODE["convert"],
    script:
        "../workflow_scripts/convert_train_masks.py"


rule split_support:
    input:
        root=dataset_root(),
        train="results/converted/train",
        valid=validated(),
    output:
        directory("results/converted/split"),
    log:
        "results/logs/split_support.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dataset=split_settings(),
        novel=CFG["classes"]["novel"],
        code=CODE["convert"],
    script:
        "../workflow_scripts/split_support.py"
