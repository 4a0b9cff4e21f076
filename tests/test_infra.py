"""Smoke tests of the local infrastructure (infra/*/start.sh through the conftest fixtures): each real
service does its job, and every socket it listens on is bound to 127.0.0.1 (checked from /proc/net/tcp*,
the same table `ss -ltnp` shows)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.services


def _listening_sockets() -> list[tuple[str, int]]:
    """(local address "ip:port", pid) of every listening TCP socket, read from /proc (like `ss -ltnp`)."""
    inode_addr: dict[str, str] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = str(ipaddress.IPv6Address(raw))
            else:
                ip = str(ipaddress.IPv4Address(raw[::-1]))
            inode_addr[f[9]] = f"{ip}:{int(hex_port, 16)}"
    out = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inode_addr:
            out.append((inode_addr[target[8:-1]], int(fd.parent.parent.name)))
    return out


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _process_tree(pidfile: Path) -> set[int]:
    """The PID recorded in `pidfile` and all its descendants."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree = {int(pidfile.read_text().strip())}
    grew = True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _assert_loopback_only(names: tuple[str, ...] = (), pids: set[int] = frozenset()) -> int:
    """No listening socket of a process named in `names` or with a PID in `pids` is off 127.0.0.1.
    Returns how many sockets were checked."""
    mine = {(addr, pid) for addr, pid in _listening_sockets() if pid in pids or _process_name(pid) in names}
    offenders = sorted((addr, pid, _process_name(pid)) for addr, pid in mine if not addr.startswith("127.0.0.1:"))
    assert not offenders, f"sockets not bound to 127.0.0.1: {offenders}"
    return len(mine)


def _run(cmd: list[str], env: dict[str, str], timeout: float = 60) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_slurm_one_node_runs_two_tasks(slurm_cluster):
    assert slurm_cluster.nodes == ["localhost"]
    out = _run(["srun", "-n2", "bash", "-c", "echo rank=$SLURM_PROCID node=$SLURMD_NODENAME"], slurm_cluster.env)
    assert sorted(out.split("\n")[:2]) == ["rank=0 node=localhost", "rank=1 node=localhost"]
    # A batch job too: sbatch --wait returns when it has finished.
    out = _run(["sbatch", "--parsable", "--wait", "-n2", "--wrap", "srun bash -c 'echo task $SLURM_PROCID'",
                f"--output={slurm_cluster.conf.parent}/job-%j.out"], slurm_cluster.env)
    job_id = out.strip().split(";")[0]
    text = (slurm_cluster.conf.parent / f"job-{job_id}.out").read_text()
    assert sorted(text.split()) == ["0", "1", "task", "task"]
    _assert_loopback_only(("slurmctld", "slurmd", "srun"))


def test_slurm_two_nodes_one_task_each(slurm_two_nodes):
    assert slurm_two_nodes.nodes == ["n1", "n2"]
    out = _run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURM_PROCID $SLURMD_NODENAME"],
               slurm_two_nodes.env)
    assert sorted(out.split("\n")[:2]) == ["0 n1", "1 n2"]
    # Each node has its own slurmd listening on loopback (node ports P and P+1).
    slurmd = {addr for addr, pid in _listening_sockets() if _process_name(pid) == "slurmd"}
    assert len(slurmd) >= 2 and all(a.startswith("127.0.0.1:") for a in slurmd), slurmd
    _assert_loopback_only(("slurmctld", "slurmd"))


def test_s3_round_trip_and_wrong_secret(s3_server):
    import s3fs

    url = s3_server.make_bucket("infra-smoke")
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    payload = bytes(range(256)) * 4096  # 1 MiB
    fs.pipe(f"{url}/dir/blob.bin", payload)
    assert fs.cat(f"{url}/dir/blob.bin") == payload
    assert fs.ls(f"{url}/dir") == ["infra-smoke/dir/blob.bin"]
    bad = s3fs.S3FileSystem(key=s3_server.access_key, secret="not-the-secret", skip_instance_cache=True,
                            client_kwargs={"endpoint_url": s3_server.endpoint_url})
    with pytest.raises(PermissionError):
        bad.cat(f"{url}/dir/blob.bin")
    assert _assert_loopback_only(pids=_process_tree(s3_server.state_dir / "weed.pid")) >= 5


def test_mlflow_metric_and_artifact_in_s3(mlflow_server, s3_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp_id = client.create_experiment(f"infra-smoke-{time.time_ns()}")
    run = client.create_run(exp_id, run_name="smoke")
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    (tmp_path / "note.txt").write_text("hello artifact")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)

    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    # The server proxies artifacts into the object store's bucket.
    fs = s3_server.filesystem()
    found = [p for p in fs.find("mlflow-artifacts") if run.info.run_id in p]
    assert found and found[0].endswith("/artifacts/note.txt"), found
    assert fs.cat(found[0]) == b"hello artifact"
    pids = _process_tree(mlflow_server.infra_dir / "mlflow" / "mlflow.pid")
    assert _assert_loopback_only(pids=pids) >= 1
