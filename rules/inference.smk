# Inference (method section 7): base classes, each novel class, then the overlay chain in the configured order.


rule infer_base:
    input:
        model="results/models/base.pt",
        train="results/converted/train",
        mapping="results/mapping/prompts.json",
        queries="results/converted/split",
        valid=validated(),
    output:
        directory("results/predictions/base"),
    log:
        "results/logs/infer_base.log",
    benchmark:
        "results/benchmarks/infer_base.tsv"
    priority: PRIORITY["base_inference"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=fc.base_inference_settings(CFG),
        code=CODE["infer"],
    script:
        "../workflow_scripts/infer_base.py"


rule infer_novel:
    input:
        model="results/models/base.pt",
        prompt="results/prompts/{cls}/prompt.pt",
        queries="results/converted/split",
        valid=validated(),
    output:
        report(
            directory("results/predictions/novel_{cls}"),
            patterns=["previews/{stem}.png"],
            caption="../report/previews.rst",
            category="Predictions",
            subcategory="novel class {cls}",
        ),
    log:
        "results/logs/infer_novel_{cls}.log",
    benchmark:
        "results/benchmarks/infer_novel_{cls}.tsv"
    priority: PRIORITY["prompt_chain"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=lambda wc: fc.novel_inference_settings(CFG, int(wc.cls)),
        code=CODE["infer"],
    script:
        "../workflow_scripts/infer_novel.py"


rule infer_novel_pair:
    # the ablation: each novel class under its best support pair as a plain prompt
    input:
        model="results/models/base.pt",
        prompt="results/prompts/{cls}/pair.pt",
        queries="results/converted/split",
        valid=validated(),
    output:
        directory("results/predictions/pair_{cls}"),
    log:
        "results/logs/infer_novel_pair_{cls}.log",
    benchmark:
        "results/benchmarks/infer_novel_pair_{cls}.tsv"
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=lambda wc: fc.novel_inference_settings(CFG, int(wc.cls)),
        code=CODE["infer"],
    script:
        "../workflow_scripts/infer_novel.py"


rule measure_background:
    # for overlay/background_check "auto": how much of the class the base model leaves at 0 on its support tiles
    input:
        model="results/models/base.pt",
        train="results/converted/train",
        train_embeddings="results/mapping/embeddings_train.npz",
        support_embeddings="results/mapping/embeddings_support.npz",
        support="results/converted/split",
        valid=validated(),
    output:
        "results/validation/background_{cls}.json",
    log:
        "results/logs/measure_background_{cls}.log",
    benchmark:
        "results/benchmarks/measure_background_{cls}.tsv"
    priority: PRIORITY["overlay_input"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=lambda wc: fc.background_settings(CFG, int(wc.cls)),
        code=CODE["infer"],
    script:
        "../workflow_scripts/measure_background.py"


rule overlay_step:
    input:
        unpack(overlay_background),
        previous=overlay_previous,
        novel=overlay_novel,
        mapping="results/mapping/prompts.json",
        queries="results/converted/split",
    output:
        report(
            directory("results/predictions/overlay_{step}"),
            patterns=["previews/{stem}.png"],
            caption="../report/previews.rst",
            category="Predictions",
            subcategory="overlay step {step}",
        ),
    log:
        "results/logs/overlay_step_{step}.log",
    conda:
        "../envs/fewseg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=lambda wc: fc.overlay_step_settings(CFG, int(wc.step)),
        palette=CFG["classes"]["palette"],
        novel=CFG["classes"]["novel"],
        code=CODE["overlay"],
    script:
        "../workflow_scripts/overlay_step.py"
