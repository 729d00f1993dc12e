"""The per-node launch plan of a SLURM job: the one place that builds the torchrun command.

    python launch/slurm/plan.py dry-run RECIPE DS_CONFIG [trainer args...]  # print every node's command
    python launch/slurm/plan.py node    RECIPE DS_CONFIG [trainer args...]  # this node: run torchrun, relay signals
    python launch/slurm/plan.py run-dir RECIPE DS_CONFIG [trainer args...]  # the run folder the job writes to
    python launch/slurm/plan.py hosts                                       # the job's hosts, one per line

Standard library only (it runs before any environment check). Inputs come from the SLURM
environment of the job (SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID,
SLURM_JOB_NAME, SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE), so faking those variables is enough
to test it without SLURM. Overrides: AVSR_HOSTS (explicit host list), AVSR_NPROC_PER_NODE,
AVSR_RDZV_PORT (or MASTER_PORT), AVSR_RUN_DIR, AVSR_TRAIN_SCRIPT, AVSR_TORCHRUN, AVSR_MAX_RESTARTS.

Signals (`node` mode). SLURM sends SIGTERM (scancel, `scontrol requeue`, preemption, the time
limit) to every process of the job step: this process, torchrun, the trainer ranks and their
DataLoader workers; `job.sh` relays the batch shell's SIGUSR1 (`--signal=B:USR1@...`) through srun
to this process only. This process is the one relay: it starts torchrun with SIGUSR1 and SIGTERM
*ignored* (PET_SIGNALS_TO_HANDLE keeps torch versions that have --signals-to-handle from
installing their own SIGTERM handler, which would end torchrun with an error after the workers are
done; torchrun's default action for SIGUSR1 is to die) and delivers each SIGUSR1/SIGTERM it
receives to torchrun's worker processes itself, once per worker and only after the worker has
installed a handler for it (read from /proc/PID/status SigCgt), so a signal that arrives while the
model is still loading is held until the trainer can act on it. The trainer finishes its step, agrees across ranks, checkpoints and exits 0, so
torchrun and this process exit 0 as well. DataLoader workers and the figure pool ignore the
signals (trainer/helper_signals.py).
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class PlanError(ValueError):
    """A mistaken job input (environment, paths): `error: plan: ...`, one line, exit status 2 (the style of
    every command here; trainer/config_checks.py's user_error, which this stdlib-only file cannot import)."""
DEFAULT_PORT_BASE = 29500
RUN_DIR_FLAGS = ("--train.run-dir", "--train.run_dir")
# Environment shown in the dry run (what the job sets or inherits that shapes the launch).
SHOWN_ENV = re.compile(r"^(NCCL_|TORCH_NCCL_|TORCH_ELASTIC_|TORCHELASTIC_|MLFLOW_|OMP_NUM_THREADS$|CUDA_VISIBLE_DEVICES$)")


# ---- host lists ----------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split a SLURM host list on the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in host list")
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        elif item.isdigit():
            out.append(item)
        else:
            raise ValueError(f"bad host index {item!r} in host list")
    return out


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM host list without `scontrol`: 'gpu[01-03,07],login1' or 'r[1-2]n[1-2]'."""
    hosts: list[str] = []
    for part in _split_top_level(text):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_expand_range(p[1:-1]) if p.startswith("[") else [p] for p in pieces]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def job_hosts(env: dict[str, str]) -> list[str]:
    """The job's hosts in SLURM order: AVSR_HOSTS, else `scontrol show hostnames`, else our parser."""
    if env.get("AVSR_HOSTS"):
        return env["AVSR_HOSTS"].replace(",", " ").split()
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise PlanError("plan: SLURM_JOB_NODELIST is not set (not inside a SLURM job?); "
                         "set it, or AVSR_HOSTS, to plan a launch")
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass                    # fall back to the parser (e.g. scontrol cannot reach slurmctld)
    return expand_hostlist(nodelist)


# ---- GPUs per node -------------------------------------------------------------------------------
def _count_gres(value: str) -> int | None:
    """'8', 'h100:8', 'gpu:h100:8' or 'a100:4,h100:4' -> the GPU count."""
    total, found = 0, False
    for item in value.split(","):
        last = item.strip().split(":")[-1]
        m = re.match(r"^(\d+)", last)
        if m:
            total += int(m.group(1))
            found = True
    return total if found else None


def gpus_per_node(env: dict[str, str]) -> int:
    for key in ("AVSR_NPROC_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            n = _count_gres(env[key])
            if n:
                return n
    if env.get("CUDA_VISIBLE_DEVICES"):
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    return 1


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    hosts: list[str]
    nproc_per_node: int
    rdzv_port: int
    job_id: str
    run_dir: str
    recipe: str
    ds_config: str
    extra: list[str] = field(default_factory=list)
    script: str = "launch/train.py"
    torchrun: list[str] = field(default_factory=lambda: ["torchrun"])
    max_restarts: int = 0

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.hosts[0]}:{self.rdzv_port}"

    def command(self, node_rank: int) -> list[str]:
        """torchrun on node `node_rank`. With the c10d rendezvous torchrun assigns the group ranks
        itself (the first host runs the store); --node_rank is what SLURM says (SLURM_NODEID) and
        is the rank torchrun uses only with a static rendezvous."""
        if not 0 <= node_rank < self.nnodes:
            raise PlanError(f"plan: node rank {node_rank} outside 0..{self.nnodes - 1}")
        cmd = [*self.torchrun,
               f"--nnodes={self.nnodes}", f"--nproc_per_node={self.nproc_per_node}",
               f"--node_rank={node_rank}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={self.job_id}",
               f"--max_restarts={self.max_restarts}",
               self.script, "--config", self.ds_config, "--recipe", self.recipe]
        if not _has_run_dir(self.extra):
            cmd += ["--train.run-dir", self.run_dir]
        return cmd + list(self.extra)


def _has_run_dir(args: list[str]) -> bool:
    return any(a in RUN_DIR_FLAGS or a.startswith(tuple(f + "=" for f in RUN_DIR_FLAGS)) for a in args)


def _run_dir_from(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a in RUN_DIR_FLAGS and i + 1 < len(args):
            return args[i + 1]
        for flag in RUN_DIR_FLAGS:
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
    return None


def run_dir_for(env: dict[str, str], extra: list[str]) -> str:
    """--train.run-dir if given, else AVSR_RUN_DIR, else runs/$SLURM_JOB_NAME: a requeued job keeps
    its name and id, so it lands in the same folder and resumes from there (--train.resume auto)."""
    given = _run_dir_from(extra)
    if given:
        return given
    if env.get("AVSR_RUN_DIR"):
        return env["AVSR_RUN_DIR"]
    name = env.get("SLURM_JOB_NAME") or f"job{env.get('SLURM_JOB_ID', 'local')}"
    return f"runs/{name}"


def make_plan(env: dict[str, str], recipe: str, ds_config: str, extra: list[str]) -> Plan:
    hosts = job_hosts(env)
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes and int(nnodes) != len(hosts):
        raise PlanError(f"plan: SLURM_NNODES={nnodes} but the host list has {len(hosts)} hosts: {hosts}")
    job_id = env.get("SLURM_JOB_ID", "0")
    port = env.get("AVSR_RDZV_PORT") or env.get("MASTER_PORT")
    # A port derived from the job id: two jobs sharing a node do not collide; requeues reuse it.
    rdzv_port = int(port) if port else DEFAULT_PORT_BASE + (int(job_id) % 2000 if job_id.isdigit() else 0)
    for path, what in ((recipe, "recipe"), (ds_config, "DeepSpeed config")):
        if not Path(path).is_file():
            raise PlanError(f"plan: {what} {path!r} not found (paths are relative to {Path.cwd()})")
        if Path(path).stat().st_size == 0:
            raise PlanError(f"plan: {what} {path!r} is empty")
    return Plan(hosts=hosts, nproc_per_node=gpus_per_node(env), rdzv_port=rdzv_port, job_id=job_id,
                run_dir=run_dir_for(env, extra), recipe=recipe, ds_config=ds_config, extra=list(extra),
                script=env.get("AVSR_TRAIN_SCRIPT", "launch/train.py"),
                torchrun=shlex.split(env.get("AVSR_TORCHRUN", "torchrun")),
                max_restarts=int(env.get("AVSR_MAX_RESTARTS", "0")))


def dry_run(plan: Plan, env: dict[str, str]) -> str:
    lines = [f"# dry run: job {plan.job_id}, {plan.nnodes} node(s) x {plan.nproc_per_node} process(es), "
             f"rendezvous c10d at {plan.rdzv_endpoint}, run dir {plan.run_dir}",
             "# srun --nodes={n} --ntasks={n} --ntasks-per-node=1 --kill-on-bad-exit=1 "
             "python launch/slurm/plan.py node ... runs on every node:".format(n=plan.nnodes)]
    shown = {k: v for k, v in sorted(env.items()) if SHOWN_ENV.match(k)}
    if shown:
        lines.append("# env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()))
    for rank, host in enumerate(plan.hosts):
        lines.append(f"[node {rank} {host}] {shlex.join(plan.command(rank))}")
    return "\n".join(lines)


# ---- node mode: run torchrun, relay stop signals to the workers ----------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _catches(pid: int, sig: int) -> bool:
    """True once process `pid` has a handler installed for `sig` (bit sig-1 of SigCgt)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _ignore_stop_signals() -> None:
    """torchrun's preexec: the stop signals are this process's to relay (see the module docstring)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_node(plan: Plan, env: dict[str, str]) -> int:
    node_rank = int(env.get("SLURM_NODEID", "0"))
    cmd = plan.command(node_rank)
    host = plan.hosts[node_rank]
    print(f"[node {node_rank} {host}] {shlex.join(cmd)}", flush=True)
    pending: list[int] = []

    def on_signal(signum, _frame):
        print(f"[node {node_rank}] got {signal.Signals(signum).name}: relaying it to the trainer processes",
              flush=True)
        if signum not in pending:
            pending.append(signum)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    torch_env = {**env, "PET_SIGNALS_TO_HANDLE": env.get("PET_SIGNALS_TO_HANDLE", "SIGINT,SIGHUP,SIGQUIT")}
    proc = subprocess.Popen(cmd, preexec_fn=_ignore_stop_signals, env=torch_env)
    delivered: set[tuple[int, int]] = set()
    while True:
        try:
            rc = proc.wait(timeout=0.2)
            return 128 - rc if rc < 0 else rc        # killed by a signal: the shell's 128+N
        except subprocess.TimeoutExpired:
            pass
        for sig in list(pending):
            for pid in _children(proc.pid):
                if (pid, sig) not in delivered and _catches(pid, sig):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        continue
                    delivered.add((pid, sig))


# ---- command line --------------------------------------------------------------------------------
USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:              # PlanError, a bad host list, a non-number in a SLURM_/AVSR_ variable
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    env = dict(os.environ)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    mode, rest = argv[0], argv[1:]
    if mode == "hosts":
        print("\n".join(job_hosts(env)))
        return 0
    if mode not in ("dry-run", "node", "run-dir") or len(rest) < 2:
        raise PlanError(f"plan: unknown mode or missing arguments in {shlex.join(argv)!r}; usage: "
                        "plan.py dry-run|node|run-dir RECIPE DS_CONFIG [trainer args...] | hosts (see --help)")
    recipe, ds_config, extra = rest[0], rest[1], rest[2:]
    if mode == "run-dir":
        print(run_dir_for(env, extra))
        return 0
    plan = make_plan(env, recipe, ds_config, extra)
    if mode == "dry-run":
        print(dry_run(plan, env))
        return 0
    return run_node(plan, env)


if __name__ == "__main__":
    sys.exit(main())
