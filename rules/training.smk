# Training (method sections 5 and 6): base fine-tuning, then each novel class's prompt in two phases, starting
# from its best support pair (prompt_training.init: support_pair) or from noise (random, as published).
# Checkpoints under results/checkpoints survive a killed job, so a rerun resumes where it stopped.


rule train_base:
    input:
        train="results/converted/train",
        weights=pretrained_weights(),
        valid=validated(),
    output:
        model="results/models/base.pt",
        history="results/models/base_history.csv",
        plot=report(
            "results/models/base_history.png",
            caption="../report/base_training.rst",
            category="Training",
        ),
    log:
        "results/logs/train_base.log",
    benchmark:
        "results/benchmarks/train_base.tsv"
    priority: PRIORITY["base_model"]
    conda:
        "../envs/fewseg.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=fc.base_training_gpus(CFG),
    params:
        settings=fc.base_training_settings(CFG),
        checkpoint_dir="results/checkpoints/base",
        code=CODE["train"],
    script:
        "../workflow_scripts/train_base.py"


rule select_support_pair:
    input:
        model="results/models/base.pt",
        support="results/converted/split",
        valid=validated(),
    output:
        pair="results/prompts/{cls}/pair.pt",
    log:
        "results/logs/select_support_pair_{cls}.log",
    benchmark:
        "results/benchmarks/select_support_pair_{cls}.tsv"
    priority: PRIORITY["prompt_chain"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=lambda wc: fc.pair_settings(CFG, int(wc.cls)),
        code=CODE["train"],
    script:
        "../workflow_scripts/select_support_pair.py"


rule train_prompt_phase1:
    input:
        model="results/models/base.pt",
        support="results/converted/split",
        pair=phase1_start,
        valid=validated(),
    output:
        prompt="results/prompts/{cls}/phase1.pt",
        history="results/prompts/{cls}/phase1_history.csv",
    log:
        "results/logs/train_prompt_phase1_{cls}.log",
    benchmark:
        "results/benchmarks/train_prompt_phase1_{cls}.tsv"
    priority: PRIORITY["prompt_chain"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        settings=lambda wc: fc.phase_settings(CFG, int(wc.cls), 1),
        phase=1,
        checkpoint_dir="results/checkpoints/prompt_{cls}",
        code=CODE["train"],
    script:
        "../workflow_scripts/train_prompt.py"


rule train_prompt_phase2:
    input:
        model="results/models/base.pt",
        support="results/converted/split",
        init="results/prompts/{cls}/phase1.pt",
        valid=validated(),
    output:
        prompt="results/prompts/{cls}/prompt.pt",
        history="results/prompts/{cls}/phase2_history.csv",
    log:
        "results/logs/train_prompt_phase2_{cls}.log",
    benchmark:
        "results/benchmarks/train_prompt_phase2_{cls}.tsv"
    priority: PRIORITY["prompt_chain"]
    conda:
        "../envs/fewseg.yaml"
    threads: CLASS_JOB_THREADS
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        settings=lambda wc: fc.phase_settings(CFG, int(wc.cls), 2),
        phase=2,
        checkpoint_dir="results/checkpoints/prompt_{cls}",
        code=CODE["train"],
    script:
        "../workflow_scripts/train_prompt.py"
