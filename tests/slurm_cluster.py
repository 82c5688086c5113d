"""A real Slurm cluster for tests (Debian's slurmctld / slurmd / munge, installed by scripts/install.sh):
munged, slurmctld and two slurmd "nodes" (n1, n2) on this host, each on its own port, all as root under a
temporary folder; started by the session fixture ``slurm_cluster`` and stopped (by pid) at the end.

Node names do not resolve: NodeAddr is 127.0.0.1, which vitpipe reads from ``scontrol show node`` for the
master address. Clients find the cluster through ``SLURM_CONF`` (``cluster.env``).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root, self.cpus = root, cpus_per_node
        self.host = socket.gethostname()
        self.procs: list[subprocess.Popen] = []
        self.munge_socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        ctld, n1, n2 = free_port(), free_port(), free_port()
        while n2 != n1 + 1:  # a node range needs consecutive ports
            n1 = free_port()
            n2 = n1 + 1
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", n2))
                except OSError:
                    n2 = -1
        r = self.root
        self.conf.write_text(f"""\
ClusterName=vitpipe-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/ctld
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=10
NodeName=n[1-2] NodeHostname={self.host} NodeAddr=127.0.0.1 Port=[{n1}-{n2}] CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
        if missing:
            # Only these tests need Slurm: a user without root installs vitpipe without it.
            pytest.skip(f"{', '.join(missing)} not installed: `scripts/install.sh --with-slurm` (as root, as "
                        "scripts/test.sh does) installs slurmctld slurmd slurm-client munge")
        (self.root / "munge").mkdir(parents=True, mode=0o700)
        (self.root / "ctld").mkdir()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()
        m = self.root / "munge"
        self._spawn(["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged")
        env = {**os.environ, **self.env}
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], env)
        for node in ("n1", "n2"):
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], env)
        self._wait(lambda: self.idle_nodes() == 2, "two idle slurmd nodes")

    def _spawn(self, cmd: list[str], env: dict | None = None) -> None:
        log = (self.root / f"{cmd[0]}-{len(self.procs)}.out").open("ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} exited during start-up: see {self.root}")
            time.sleep(0.3)
        pytest.fail(f"{what} not ready within {timeout:.0f} s: see {self.root}")

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return sum(1 for line in out.splitlines() if line.split()[-1] == "idle")

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False)
        m = re.search(r"JobState=(\S+)", out)
        return m.group(1) if m else "UNKNOWN"

    def wait_job(self, job: str, timeout: float = 300) -> str:
        """Wait until ``job`` has ended (COMPLETED, FAILED, ...); returns its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            if state == "PENDING" and "BeginTime" in self.run("scontrol", "show", "job", job, check=False):
                # a requeued job waits ~2 min for its begin time: start it now
                self.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
            time.sleep(1)
        raise TimeoutError(f"Slurm job {job} still {self.job_state(job)} after {timeout:.0f} s\n"
                           + self.hang_report(job))

    def hang_report(self, job: str) -> str:
        """What a job that does not end is doing: its record, the processes on this host, and the Python
        stacks its tasks print on SIGUSR2 (vitpipe's CLI registers them), read from the job's output."""
        record = self.run("scontrol", "show", "job", job, check=False)
        self.run("scancel", "--signal=USR2", job, check=False)
        time.sleep(5)
        procs = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args", "--forest"], capture_output=True,
                               text=True).stdout
        procs = "\n".join(line for line in procs.splitlines() if re.search(r"slurm|srun|vitpipe|python", line))
        out = re.search(r"StdOut=(\S+)", record)
        log = Path(out.group(1)).read_text(errors="replace")[-20000:] if out and Path(out.group(1)).is_file() else ""
        return f"{record}\n--- processes\n{procs}\n--- job output (tail)\n{log}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
