"""Run workflows through a real one-node Slurm cluster on localhost.

The cluster is started by ``.ci/slurm/start-cluster.sh`` (root needed; it
installs Slurm with apt if missing). Run with::

    # smoke test (toy workflow, about a minute) and the profile check
    timeout -k 10 600 python -m pytest tests/test_slurm.py -k "toy or profile" -q -x
    # everything, including the demo workflow compared with a local run (~10 min on 2 cores)
    timeout -k 10 2400 python -m pytest tests/test_slurm.py -m slurm -q -x

Snakemake is started with the repository's ``profiles/slurm`` profile, so
every rule not listed under ``localrules`` is submitted with ``sbatch``. The
profile's site-specific requests (GPU partition, GPUs, tens of GB of memory)
cannot be met by the test node, so the test replaces them on the command line
(see ``snakemake_slurm_command``): no GPUs, small memory, the test partition.

The test cluster runs without an accounting database (no slurmdbd), so
Snakemake polls with ``squeue`` and the job records are read from
``squeue --states=all`` (slurmctld keeps finished jobs for MinJobAge = 1 h,
including the ``--comment`` that names the rule) and cross-checked against
the cluster's plain-text job completion log (JobCompType=jobcomp/filetxt).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
START_CLUSTER = REPO / ".ci" / "slurm" / "start-cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
PARTITION = os.environ.get("FEWSEG_SLURM_PARTITION", "debug")
# Threads per job, identical for the Slurm run and the local reference run
# (snakemake --cores CORES), so thread-count-dependent numerics cannot differ.
CORES = 2
# Memory (MB) and wall time (min) requested per job on the test node.
TEST_MEM_MB = 1000
TEST_RUNTIME_MIN = 30
# Wall-clock limit (seconds) of one snakemake invocation; FEWSEG_SLURM_RUN_TIMEOUT overrides.
TOY_TIMEOUT_S = int(os.environ.get("FEWSEG_SLURM_RUN_TIMEOUT", "300"))
DEMO_TIMEOUT_S = int(os.environ.get("FEWSEG_SLURM_RUN_TIMEOUT", "1800"))

# The real workflow: rules that must never be submitted to Slurm.
WORKFLOW_LOCAL_RULES = {
    "make_demo_dataset",
    "convert_train_masks",
    "split_support",
    "overlay_step",
    "job_statistics",
    "make_submission",
    "evaluate",
    "compare_prompts",
}
# ... and rules that go through sbatch (they carry GPU requests in the profile).
WORKFLOW_REMOTE_RULES = {
    "embed_tiles",
    "rank_prompts",
    "train_base",
    "train_prompt_phase1",
    "train_prompt_phase2",
    "infer_base",
    "infer_novel",
    "select_support_pair",
    "infer_novel_pair",
    "measure_background",
}

SQUEUE_FIELDS = {
    # squeue -o letter: record key
    "i": "job_id",
    "j": "name",
    "k": "comment",
    "T": "state",
    "P": "partition",
    "C": "cpus",
    "m": "min_memory",
    "l": "time_limit",
    "b": "gres",
    "Z": "workdir",
}


# --------------------------------------------------------------------------
# cluster
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmCluster:
    jobcomp_log: Path
    min_job_age_s: int
    node_cpus: int


def _run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _scontrol_config() -> dict[str, str]:
    out = _run(["scontrol", "show", "config"]).stdout
    conf = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    return conf


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """Start (or reuse) the local test cluster; fail, never skip, if that is impossible.

    The cluster is left running afterwards so that repeated test runs are fast;
    stop it with .ci/slurm/stop-cluster.sh.
    """
    if os.geteuid() != 0:
        pytest.fail(f"{START_CLUSTER} needs root to install and start Slurm", pytrace=False)
    t0 = time.monotonic()
    try:
        proc = _run(["timeout", "-k", "10", "300", "bash", str(START_CLUSTER)], timeout=330)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{START_CLUSTER} hung", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{START_CLUSTER} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    sys.stderr.write(f"\nSlurm test cluster ready in {time.monotonic() - t0:.1f}s\n")

    conf = _scontrol_config()
    jobcomp = conf.get("JobCompLoc", "")
    assert conf.get("JobCompType") == "jobcomp/filetxt" and jobcomp, conf.get("JobCompType")
    min_job_age = int(re.match(r"\d+", conf.get("MinJobAge", "0")).group())
    # squeue-based status checks and record lookups need finished jobs to stay visible.
    assert min_job_age >= 600, f"MinJobAge={min_job_age}s is too short for squeue status checks"
    cpus = _run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%c"]).stdout.split()
    assert cpus, f"partition {PARTITION!r} has no node"
    node_cpus = int(cpus[0])
    assert node_cpus >= CORES, f"test node has {node_cpus} CPUs, need {CORES}"
    return SlurmCluster(Path(jobcomp), min_job_age, node_cpus)


# --------------------------------------------------------------------------
# running snakemake through Slurm
# --------------------------------------------------------------------------
def _snakemake() -> list[str]:
    return [sys.executable, "-m", "snakemake"]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the test process dies (Linux prctl PR_SET_PDEATHSIG).

    Keeps an aborted test run from leaving snakemake (and its Slurm jobs) behind:
    timeout(1) forwards the SIGTERM to snakemake and escalates to SIGKILL.
    """
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _clean_env() -> dict[str, str]:
    # Never let a surrounding Slurm allocation leak into the submissions.
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def list_rules(snakefile: Path, configfile: Path | None, workdir: Path) -> list[str]:
    cmd = [*_snakemake(), "--snakefile", str(snakefile), "--directory", str(workdir), "--list-rules"]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    proc = _run(cmd, timeout=120, cwd=workdir, env=_clean_env())
    assert proc.returncode == 0, f"snakemake --list-rules failed:\n{proc.stdout}\n{proc.stderr}"
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip() and not ln[0].isspace()]


def snakemake_slurm_command(snakefile: Path, configfile: Path | None, workdir: Path, targets, rules) -> list[str]:
    """The snakemake command line used to run a workflow on the test cluster.

    Uses profiles/slurm unchanged except for what the test node cannot provide:
    a command-line --default-resources / --set-resources replaces the profile's
    blocks, so every rule runs on the test partition with no GPU (gpu=0, no
    gpu_model), TEST_MEM_MB memory and at most CORES threads.
    """
    set_resources = []
    for rule in rules:
        set_resources += [
            f"{rule}:slurm_partition={PARTITION}",
            f"{rule}:gpu=0",
            f"{rule}:gpu_model=''",
            f"{rule}:mem_mb={TEST_MEM_MB}",
            f"{rule}:runtime={TEST_RUNTIME_MIN}",
        ]
    cmd = [
        *_snakemake(),
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--profile", str(PROFILE),
        "--workflow-profile", "none",
        # No accounting database on the test cluster: poll squeue (MinJobAge is 1 h).
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
        "--slurm-keep-successful-logs",
        "--retries", "0",
        "--latency-wait", "10",
        "--max-threads", str(CORES),
        "--default-resources",
        f"slurm_partition={PARTITION}", f"mem_mb={TEST_MEM_MB}", f"runtime={TEST_RUNTIME_MIN}",
        "--set-resources", *set_resources,
    ]  # fmt: skip
    if configfile:
        cmd += ["--configfile", str(configfile)]
    return cmd + ["--", *map(str, targets)]


def _parse_comment(comment: str) -> tuple[str | None, str]:
    # The plugin sets --comment rule_<rule>[_wildcards_<values joined by _>].
    m = re.fullmatch(r"rule_(.+?)(?:_wildcards_(.*))?", comment)
    return (m.group(1), m.group(2) or "") if m else (None, "")


def _read_jobcomp(path: Path, run_id: str) -> dict[str, dict[str, str]]:
    entries = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields.get("Name") == run_id and "JobId" in fields:
                entries[fields["JobId"]] = fields
    return entries


def slurm_job_records(run_id: str, jobcomp_log: Path, wait_s: float = 15) -> list[dict]:
    """Slurm's records of every job submitted under one snakemake run id.

    One dict per job: the squeue fields (job_id, name, comment, state,
    partition, cpus, min_memory, time_limit, gres, workdir), ``rule`` and
    ``wildcards`` decoded from the comment, and ``jobcomp`` (the job's entry in
    the completion log, ``None`` if it has none).
    """
    fmt = "|".join(f"%{letter}" for letter in SQUEUE_FIELDS)
    deadline = time.monotonic() + wait_s
    while True:
        proc = _run(["squeue", "--noheader", "--states=all", f"--name={run_id}", f"--format={fmt}"])
        assert proc.returncode == 0, f"squeue failed: {proc.stderr}"
        records = []
        for line in proc.stdout.splitlines():
            values = line.split("|")
            if len(values) != len(SQUEUE_FIELDS):
                continue
            rec = dict(zip(SQUEUE_FIELDS.values(), (v.strip() for v in values), strict=True))
            rec["rule"], rec["wildcards"] = _parse_comment(rec["comment"])
            records.append(rec)
        jobcomp = _read_jobcomp(jobcomp_log, run_id)
        for rec in records:
            rec["jobcomp"] = jobcomp.get(rec["job_id"])
        # A finished job's completion entry can trail its state change briefly.
        if all(r["jobcomp"] for r in records) or time.monotonic() > deadline:
            return sorted(records, key=lambda r: int(re.match(r"\d+", r["job_id"]).group()))
        time.sleep(1)


def run_through_slurm(
    workdir, snakefile, configfile, targets, *, timeout: int = DEMO_TIMEOUT_S, jobcomp_log=None
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``targets`` of ``snakefile`` in ``workdir`` through the local Slurm cluster.

    Returns snakemake's CompletedProcess (stdout/stderr captured, also written
    to ``<workdir>/snakemake-slurm.log``) and Slurm's records of the jobs that
    run submitted (see ``slurm_job_records``). Needs the ``slurm_cluster``
    fixture to have run. snakemake is run under ``timeout -k 10 <timeout>``;
    leftover jobs of the run are cancelled afterwards.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    snakefile = Path(snakefile).resolve()
    configfile = Path(configfile).resolve() if configfile else None
    if jobcomp_log is None:
        jobcomp_log = Path(_scontrol_config()["JobCompLoc"])

    rules = list_rules(snakefile, configfile, workdir)
    cmd = ["timeout", "-k", "10", str(timeout)] + snakemake_slurm_command(
        snakefile, configfile, workdir, targets, rules
    )
    try:
        proc = subprocess.run(
            cmd,
            cwd=workdir,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=timeout + 30,
            preexec_fn=_die_with_parent,
        )
    except subprocess.TimeoutExpired as exc:  # only if timeout(1) itself failed to kill
        proc = subprocess.CompletedProcess(cmd, 124, exc.stdout or "", exc.stderr or "")
    (workdir / "snakemake-slurm.log").write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    m = re.search(r"SLURM run ID: (\S+)", proc.stdout + proc.stderr)
    if not m:
        return proc, []
    run_id = m.group(1)
    _run(["scancel", f"--name={run_id}"])  # no-op unless the run was killed
    return proc, slurm_job_records(run_id, jobcomp_log)


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------
def _tail(proc: subprocess.CompletedProcess, n: int = 60) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-n:])


def submitted_rules(proc: subprocess.CompletedProcess) -> collections.Counter:
    """Rules of the jobs snakemake ran, from its log: ``rule X:`` = submitted, ``localrule X:`` = local."""
    log = proc.stdout + proc.stderr
    return collections.Counter(re.findall(r"^rule (\w+):$", log, flags=re.M))


def local_rules_run(proc: subprocess.CompletedProcess) -> collections.Counter:
    log = proc.stdout + proc.stderr
    return collections.Counter(re.findall(r"^localrule (\w+):$", log, flags=re.M))


def assert_ran_through_slurm(proc, records, local_rules=()) -> None:
    """Snakemake succeeded and every submitted job is a completed job in Slurm's records."""
    assert proc.returncode == 0, (
        f"snakemake exited {proc.returncode}"
        + (" (killed by timeout)" if proc.returncode in (124, 137) else "")
        + f":\n{_tail(proc)}"
    )
    assert records, f"no Slurm job records for this run:\n{_tail(proc)}"
    expected = submitted_rules(proc)
    found = collections.Counter(r["rule"] for r in records)
    assert found == expected, f"Slurm records {dict(found)} != jobs snakemake submitted {dict(expected)}"
    assert not set(found) & set(local_rules), f"local rules went through sbatch: {set(found) & set(local_rules)}"
    for rec in records:
        what = f"job {rec['job_id']} ({rec['comment']})"
        assert rec["state"] == "COMPLETED", f"{what}: state {rec['state']}"
        assert rec["partition"] == PARTITION, f"{what}: partition {rec['partition']}"
        assert rec["gres"] in ("N/A", "(null)", ""), f"{what}: requested {rec['gres']}"
        assert int(rec["cpus"]) <= CORES, f"{what}: {rec['cpus']} CPUs"
        assert rec["jobcomp"], f"{what}: missing from the completion log"
        assert rec["jobcomp"]["JobState"] == "COMPLETED", f"{what}: {rec['jobcomp']}"
        assert rec["jobcomp"]["ExitCode"] == "0:0", f"{what}: {rec['jobcomp']}"


# --------------------------------------------------------------------------
# the profile itself (dry run, no cluster needed)
# --------------------------------------------------------------------------
def test_every_submitted_rule_has_its_resources_in_the_profile():
    """A rule the Snakefile does not keep local is submitted: the profile must size it (and give it its GPU)."""
    import yaml

    snakefile = (REPO / "Snakefile").read_text()
    local = set(re.search(r"localrules:\n((?:    \w+,\n)+)", snakefile).group(1).replace(",", "").split())
    rules = set(re.findall(r"^rule (\w+):", "\n".join(p.read_text() for p in (REPO / "rules").glob("*.smk")), re.M))
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert rules - local - {"all"} == set(profile["set-resources"]) == WORKFLOW_REMOTE_RULES | {"pretrain"}
    assert WORKFLOW_LOCAL_RULES <= local


def test_profile_requests_gpus_for_gpu_rules(tmp_path):
    """profiles/slurm parses, and every submitted rule of the workflow gets a GPU and a time limit."""
    rules = sorted(WORKFLOW_REMOTE_RULES)
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        "localrules: make_submission\n\n"
        + "".join(f'rule {r}:\n    output: "{r}.out"\n    shell: "touch {{output}}"\n\n' for r in rules)
        + "rule make_submission:\n    input: "
        + ", ".join(f'"{r}.out"' for r in rules)
        + '\n    output: "submission.zip"\n    shell: "touch {output}"\n'
    )
    cmd = [
        *_snakemake(), "-n", "--snakefile", str(snakefile), "--directory", str(tmp_path),
        "--profile", str(PROFILE), "--workflow-profile", "none", "submission.zip",
    ]  # fmt: skip
    proc = _run(cmd, timeout=120, cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 0, f"dry run with {PROFILE} failed:\n{_tail(proc)}"
    log = proc.stdout + proc.stderr
    resources = dict(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", log, flags=re.M))
    assert set(rules) <= set(resources), resources
    for rule in rules:
        res = resources[rule]
        fields = dict(kv.split("=", 1) for kv in res.split(", ") if "=" in kv)
        assert int(fields.get("gpu", 0)) >= 1, f"{rule}: no GPU requested ({res})"
        assert int(fields["runtime"]) > 0 and int(fields["mem_mb"]) > 0, f"{rule}: {res}"
        assert fields.get("slurm_partition"), f"{rule}: no partition ({res})"
        assert not re.search(r"--(gres|gpus)", fields.get("slurm_extra", "")), f"{rule}: {res}"


# --------------------------------------------------------------------------
# smoke test: a toy workflow, ~1 minute
# --------------------------------------------------------------------------
TOY_SNAKEFILE = r"""
PARTS = ["a", "b"]

localrules: make_input


rule make_input:
    output: "results/input.txt"
    shell: "echo 'seed 42' > {output}; echo \"local ${{SLURM_JOB_ID:-none}}\" > results/make_input.where"


rule embed:
    input: "results/input.txt"
    output: "results/embed/{part}.txt"
    resources: gpu=0
    threads: 1
    shell:
        "echo \"embed {wildcards.part} $(cat {input})\" > {output}; "
        "echo \"$SLURM_JOB_ID\" > results/embed/{wildcards.part}.jobid"


rule train:
    # Requests what a real training rule would; the test overrides it.
    input: expand("results/embed/{part}.txt", part=PARTS)
    output: "results/model.txt"
    resources: gpu=1, gpu_model="h100", mem_mb=64000, runtime=600
    threads: 8
    shell:
        "cat {input} > {output}; echo \"threads {threads}\" >> {output}; "
        "echo \"$SLURM_JOB_ID $SLURM_CPUS_PER_TASK\" > results/model.jobid"


rule summarize:
    input: "results/model.txt"
    output: "results/summary.txt"
    run:
        import os
        text = open(input[0]).read()
        with open(output[0], "w") as fh:
            fh.write(f"lines {len(text.splitlines())}\n" + text)
        with open("results/summary.jobid", "w") as fh:
            fh.write(os.environ["SLURM_JOB_ID"] + "\n")
"""

TOY_EXPECTED_SUMMARY = f"lines 3\nembed a seed 42\nembed b seed 42\nthreads {CORES}\n"


def test_toy_workflow_through_slurm(slurm_cluster, tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(TOY_SNAKEFILE)
    workdir = tmp_path / "work"

    t0 = time.monotonic()
    proc, records = run_through_slurm(workdir, snakefile, None, ["results/summary.txt"], timeout=TOY_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    sys.stderr.write(f"\ntoy workflow through Slurm: {elapsed:.1f}s, {len(records)} jobs\n")

    assert_ran_through_slurm(proc, records, local_rules={"make_input"})
    by_rule = collections.defaultdict(list)
    for rec in records:
        by_rule[rec["rule"]].append(rec)
    assert sorted(by_rule) == ["embed", "summarize", "train"], by_rule.keys()
    assert sorted(r["wildcards"] for r in by_rule["embed"]) == ["a", "b"]
    assert local_rules_run(proc) == {"make_input": 1}

    # Each remote job ran inside the Slurm job that the records list for its rule.
    res = workdir / "results"
    ids = {rule: {r["job_id"] for r in recs} for rule, recs in by_rule.items()}
    for part in ("a", "b"):
        assert (res / "embed" / f"{part}.jobid").read_text().strip() in ids["embed"]
    job_id, cpus = (res / "model.jobid").read_text().split()
    assert job_id in ids["train"] and cpus == str(CORES)
    assert (res / "summary.jobid").read_text().strip() in ids["summarize"]
    assert (res / "make_input.where").read_text().strip() == "local none"
    # The GPU/memory-hungry rule was submitted with the test's overrides.
    (train,) = by_rule["train"]
    assert train["gres"] in ("N/A", "(null)", "") and train["min_memory"] == f"{TEST_MEM_MB}M", train
    # Results equal the reference.
    assert (res / "summary.txt").read_text() == TOY_EXPECTED_SUMMARY


# --------------------------------------------------------------------------
# the real workflow, compared with a local run
# --------------------------------------------------------------------------
def _zip_diff(a: Path, b: Path) -> str:
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        ia = {i.filename: i for i in za.infolist()}
        ib = {i.filename: i for i in zb.infolist()}
        lines = [f"only in slurm: {n}" for n in sorted(set(ia) - set(ib))]
        lines += [f"only in local: {n}" for n in sorted(set(ib) - set(ia))]
        for n in sorted(set(ia) & set(ib)):
            if ia[n].CRC != ib[n].CRC:
                lines.append(f"content differs: {n}")
            elif ia[n].date_time != ib[n].date_time:
                lines.append(f"timestamp differs: {n} {ia[n].date_time} vs {ib[n].date_time}")
    return "\n".join(lines) or "members identical; archive metadata differs"


def test_demo_workflow_through_slurm(slurm_cluster, local_run, tmp_path):
    """The demo workflow's submission is byte-identical through Slurm and locally."""
    snakefile = REPO / "Snakefile"
    configfile = REPO / "tests" / "config.test.yaml"
    target = "results/submission.zip"
    assert snakefile.is_file(), f"{snakefile} does not exist"
    assert configfile.is_file(), f"{configfile} does not exist"

    proc, records = run_through_slurm(tmp_path / "slurm", snakefile, configfile, [target])
    assert_ran_through_slurm(proc, records, local_rules=WORKFLOW_LOCAL_RULES)
    submitted = {r["rule"] for r in records}
    assert submitted <= WORKFLOW_REMOTE_RULES, (
        f"unexpected rules went through Slurm: {submitted - WORKFLOW_REMOTE_RULES}; "
        "give them resources in profiles/slurm/config.yaml and list them in WORKFLOW_REMOTE_RULES"
    )
    assert {"train_base", "infer_base", "infer_novel"} <= submitted, submitted

    slurm_zip = tmp_path / "slurm" / target
    local_zip = tmp_path / "local.zip"
    local_zip.write_bytes(local_run.submission)  # the shared local run on the same config, --cores 2
    if slurm_zip.read_bytes() != local_zip.read_bytes():
        # keep both for inspection
        keep = tmp_path / "mismatch"
        keep.mkdir(exist_ok=True)
        shutil.copy(slurm_zip, keep / "slurm.zip")
        shutil.copy(local_zip, keep / "local.zip")
        pytest.fail(f"submission.zip differs (kept in {keep}):\n{_zip_diff(slurm_zip, local_zip)}")
