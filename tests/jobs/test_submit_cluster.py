"""`vmae submit/status/logs/stop` against a real two-node Ray cluster started on this machine.

Both nodes are `ray start --block` processes in their own sessions: SIGTERM to them stops exactly this
cluster (never a global `ray stop`, other tests may run their own Ray). A final sweep kills job drivers
that Ray started in sessions of their own, found by the GCS address in their environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

# The job every cluster must pass: two live nodes, a task pinned to each, and the uploaded working_dir
# (jobs/ present, .venv left out).
NODE_CHECK = """
import os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init()
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
here = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id())
ran = ray.get([here.options(scheduling_strategy=On(n, soft=False)).remote() for n in alive])
print("NODES", len(alive), "RAN_ON", len(set(ran)))
print("UPLOAD", os.path.isfile("jobs/cli.py"), os.path.exists(".venv"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class LocalCluster:
    address: str  # dashboard URL for the Jobs API
    gcs: str
    temp_dir: str
    procs: list[subprocess.Popen]
    env: dict[str, str]

    def get(self, endpoint: str, attempts: int = 3) -> dict:
        """GET a dashboard JSON endpoint with this cluster's token. A request that times out (a dashboard slow
        under load says nothing of the jobs) is asked again, up to ``attempts`` times in all; any other error,
        e.g. a refused connection while the head starts, is raised at once."""
        for _ in range(attempts - 1):
            try:
                return self._get_once(endpoint)
            except (TimeoutError, urllib.error.URLError) as e:
                if not isinstance(e, TimeoutError) and not isinstance(
                    getattr(e, "reason", None), TimeoutError
                ):
                    raise
        return self._get_once(endpoint)

    def _get_once(self, endpoint: str) -> dict:
        token = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        with urllib.request.urlopen(
            urllib.request.Request(self.address + endpoint, headers=token), timeout=30
        ) as r:
            return json.loads(r.read())

    def vmae(
        self, *argv: str, timeout: float = 90, extra_env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``vmae <argv>`` (the real CLI, in a subprocess) against this cluster."""
        cmd = [sys.executable, "-m", "jobs.cli", argv[0], "--address", self.address, *argv[1:]]
        env = {**self.env, **(extra_env or {})}
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ray_start(args: list[str], env: dict[str, str], log: str, cpus: int = 1) -> subprocess.Popen:
    node_ports = [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]
    cmd = [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}"]
    cmd += ["--num-gpus=0", "--object-store-memory=80000000", "--disable-usage-stats", *node_ports, *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(
                f"ray start exited while waiting for {what}:\n" + "".join(open(x).read() for x in logs)
            )
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise TimeoutError(
        f"{what} not ready after {timeout} s:\n" + "".join(open(x).read()[-3000:] for x in logs)
    )


def _pids_of(cluster: LocalCluster) -> list[int]:
    """Processes of this cluster still alive: job drivers carry its GCS address in RAY_ADDRESS (Linux /proc)."""
    gcs, found = f"RAY_ADDRESS={cluster.gcs}".encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if gcs in environ or cluster.temp_dir.encode() in cmdline:
            found.append(int(entry))
    return found


def _stop(cluster: LocalCluster) -> None:
    """SIGTERM to each `ray start --block` (it stops its node's processes in order), worker node first;
    SIGKILL to the process group of a node that does not stop; then kill stray job drivers."""
    for p in reversed(cluster.procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(cluster.procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for pid in _pids_of(cluster):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """A head (with dashboard) and one worker node, 1 CPU each, on loopback with free ports."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # the entrypoint's `python` is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # a SIGKILLed node is declared dead after 3 failed 1 s health checks (Ray's default: 5 of 3 s); SIGTERM stops
    # a node at once (by default the head first drains for up to 30 s, past _stop's 15 s wait, then is SIGKILLed)
    env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # fmt: skip
    # Token auth on (Ray's default for new clusters), with a token of our own: ~/.ray/auth_token is shared
    # with every other Ray on this machine; the vmae client must send the token too.
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
    temp_dir = tempfile.mkdtemp(prefix="vmae-ray-", dir="/tmp")  # short: Unix socket paths are < 108 chars
    gcs_port, dash_port = _free_port(), _free_port()
    head_args = [
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}/h",
    ]
    logs = [os.path.join(temp_dir, "head.log"), os.path.join(temp_dir, "worker.log")]
    cluster = LocalCluster(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", temp_dir, [], env)
    try:
        cluster.procs.append(_ray_start(head_args, env, logs[0]))
        _wait("the head's Jobs API", lambda: cluster.get("/api/version"), cluster.procs, logs[:1])
        # Its own temp dir: nodes sharing one would share runtime_resources/, and the worker node's
        # garbage collection of a job's working_dir would delete the driver's cwd on the head.
        worker_args = [f"--address={cluster.gcs}", f"--temp-dir={temp_dir}/w"]
        cluster.procs.append(_ray_start(worker_args, env, logs[1]))
        nodes = lambda: cluster.get("/api/v0/nodes")["data"]["result"]["result"]  # noqa: E731
        _wait(
            "two alive nodes", lambda: sum(n["state"] == "ALIVE" for n in nodes()) == 2, cluster.procs, logs
        )
        yield cluster
    finally:
        _stop(cluster)


def _job_id(stderr: str) -> str:
    match = re.search(r"job (\S+) submitted to", stderr)
    assert match, stderr
    return match.group(1)


# (vmae submit args, text the job's logs must show; None: what the same vmae command prints when run here).
# The debug pretrain job has its own test below (both nodes are on this machine, so a local folder is shared
# storage for them).
CLUSTER_JOBS = [
    pytest.param(
        ["--raw", "--", "python", "-c", NODE_CHECK], "NODES 2 RAN_ON 2\nUPLOAD True False", id="node-check"
    ),
    pytest.param(
        ["--", "model-info", "--model", "tiny", "--json"],
        None,
        id="model-info",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("jobs.eval.model_info") is None, reason="no jobs.eval.model_info"
        ),
    ),
]


@pytest.mark.parametrize(("submit_args", "expected"), CLUSTER_JOBS)
def test_submit_runs_to_success(local_cluster, submit_args, expected):
    if expected is None:
        argv = submit_args[submit_args.index("--") + 1 :]
        here = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, capture_output=True, text=True
        )
        assert here.returncode == 0 and here.stdout, here.stderr
        expected = here.stdout
    done = local_cluster.vmae("submit", *submit_args, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected in done.stdout, done.stdout  # streamed while the job ran
    job_id = _job_id(done.stderr)
    status = local_cluster.vmae("status", job_id)
    assert status.returncode == 0 and "status: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = local_cluster.vmae("logs", job_id)
    assert logs.returncode == 0 and expected in logs.stdout


def test_failed_job_sets_exit_code(local_cluster):
    done = local_cluster.vmae("submit", "--raw", "--", "python", "-c", "print('bye'); raise SystemExit(7)")
    assert done.returncode == 1 and "bye" in done.stdout
    status = local_cluster.vmae("status", _job_id(done.stderr))
    assert "status: FAILED" in status.stdout and "driver_exit_code: 7" in status.stdout, status.stdout


def test_stop_a_sleeping_job_with_forwarded_env(local_cluster):
    sleeper = "import os, time; print('sleeping', os.environ['WHO'], os.environ['AWS_ENDPOINT_URL'], flush=True); time.sleep(600)"
    started = local_cluster.vmae(
        "submit",
        "--no-wait",
        "--env",
        "WHO=sleeper",
        "--raw",
        "--",
        "python",
        "-c",
        sleeper,
        extra_env={"AWS_ENDPOINT_URL": "http://minio.invalid:9000"},
    )
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    deadline = time.monotonic() + 90
    while "sleeping" not in local_cluster.get(f"/api/jobs/{job_id}/logs")["logs"]:
        assert time.monotonic() < deadline, local_cluster.get(f"/api/jobs/{job_id}")
        time.sleep(0.3)
    status = local_cluster.vmae("status", job_id)
    assert "status: RUNNING" in status.stdout, status.stdout + status.stderr
    stopped = local_cluster.vmae("stop", job_id)
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stderr, stopped.stderr
    again = local_cluster.vmae("stop", job_id)
    assert again.returncode == 0 and "already ended: STOPPED" in again.stderr, again.stderr
    logs = local_cluster.vmae("logs", job_id)
    assert "sleeping sleeper http://minio.invalid:9000" in logs.stdout, logs.stdout
    listing = local_cluster.vmae("status")
    assert re.search(rf"{job_id}\s+STOPPED", listing.stdout), listing.stdout
    unknown = local_cluster.vmae("status", "raysubmit_does_not_exist")
    assert unknown.returncode == 1 and "no job" in unknown.stderr


def test_remote_decode_job_survives_losing_a_decode_node(local_cluster, tmp_path):
    """The issue's acceptance check, with decoding on other nodes: a debug pretrain job submitted through `vmae
    submit` runs its two Ray Train workers on the two nodes (1 CPU each) and finishes with its checkpoints
    written. With `loader.decode=remote` they take their batches from decode actors on two decode-only nodes,
    and one decode node is SIGKILLed mid-run: training goes on without a restart, the lost actor is replaced on
    the other decode node, and every rank trains on exactly the keys, step by step, that the local loader
    gives for the same seed: nothing lost or doubled."""
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig
    from jobs.train.metrics import read_metrics
    from jobs.train.pretrain import PretrainTask
    from pipeline.loader.loader import make_loader
    from tests.pipeline.shardset_helpers import make_shard_set

    shards = str(tmp_path / "shards")
    make_shard_set(shards, n_videos=48, n_shards=4, frames=16, width=64, height=48, pattern="moving")
    keys, temp = tmp_path / "keys", local_cluster.temp_dir
    # decode nodes with 0 logical CPUs: Ray Train's workers (1 CPU each) never land there, and the actors ask
    # for none (loader.remote.cpus=0); the box's 2 real cores are shared by everything anyway
    decode = [
        _ray_start(
            [
                f"--address={local_cluster.gcs}",
                f"--temp-dir={temp}/d{i}",
                f'--resources={{"decode": 2, "decode_node_{i}": 1}}',
            ],
            local_cluster.env,
            os.path.join(temp, f"decode{i}.log"),
            cpus=0,
        )  # fmt: skip
        for i in range(2)
    ]
    overrides = [
        f"loader.manifest={shards}/manifest.json", "loader.decode=remote", "loader.num_workers=1",
        "loader.remote.cpus=0", "loader.remote.start_timeout_s=120", "schedule.total_steps=12",
        "checkpoint.every_steps=6", "metrics.image_every=0",
    ]  # fmt: skip
    try:
        nodes = lambda: local_cluster.get("/api/v0/nodes")["data"]["result"]["result"]  # noqa: E731
        _wait("4 alive nodes", lambda: sum(n["state"] == "ALIVE" for n in nodes()) == 4, decode,
              [os.path.join(temp, f"decode{i}.log") for i in range(2)])  # fmt: skip
        # one step per Ray Train health-check poll (1 s): the run outlasts the kill and the replacement
        started = local_cluster.vmae(
            "submit", "--no-wait", "--env", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=1", "--", "pretrain", "--config",
            "configs/pretrain/debug.yaml", f"storage_path={tmp_path / 'runs'}", "name=remote", *overrides,
            f"fault.keys_log={keys}",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        job_id = started.stdout.strip()
        metrics = tmp_path / "runs" / "remote" / "logs" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and max(read_metrics(str(metrics)), default=0) >= 3):
            status = local_cluster.get(f"/api/jobs/{job_id}")["status"]
            assert status in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
                status, local_cluster.get(f"/api/jobs/{job_id}/logs")["logs"][-3000:])  # fmt: skip
            time.sleep(0.3)
        # the decode node of a live decode actor (the nodes tell themselves apart by a resource of their own)
        actors = local_cluster.get("/api/v0/actors?limit=1000")["data"]["result"]["result"]
        on = {a["node_id"] for a in actors if a["class_name"] == "DecodeActor" and a["state"] == "ALIVE"}
        which = [i for i in range(2) for n in nodes() if n["node_id"] in on
                 and f"decode_node_{i}" in n["resources_total"]]  # fmt: skip
        assert which, (on, nodes())
        os.killpg(decode[which[0]].pid, signal.SIGKILL)  # a decode node, with whatever its actor had made
        decode[which[0]].wait()
        done = local_cluster.vmae("logs", job_id, "--follow", timeout=400)
        status = local_cluster.vmae("status", job_id)
        assert "status: SUCCEEDED" in status.stdout, status.stdout + done.stdout[-3000:]
        assert "pretrain remote: step 12" in done.stdout, done.stdout[-3000:]
        # one replacement per actor lost with the node, placed on the surviving decode node
        actors = local_cluster.get("/api/v0/actors?limit=1000")["data"]["result"]["result"]
        placed = [a["node_id"] for a in actors if a["class_name"] == "DecodeActor"]
        survivor = {n["node_id"] for n in nodes() if f"decode_node_{1 - which[0]}" in n["resources_total"]}
        killed = sum(n not in survivor for n in placed)
        assert killed >= 1 and len(placed) == 2 + killed, (placed, survivor)
    finally:
        for p in decode:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    recs = read_metrics(str(metrics))
    assert max(recs) == 12 and {int(r["world_size"]) for r in recs.values()} == {2}
    steps = sorted(p.name for p in (tmp_path / "runs" / "remote").glob("step_*"))
    assert steps == ["step_00000006", "step_00000012"], steps
    trained: dict[tuple[int, int], list[list[str]]] = {}
    for path in keys.glob("rank_*.jsonl"):
        rank = int(path.name.split("_")[1].split("-")[0])
        for line in path.read_text().splitlines():
            r = json.loads(line)
            trained.setdefault((r["step"], rank), []).append(r["keys"])
    # what the local loader gives the same two ranks for the same config (decoding here, 1 worker process each)
    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs/pretrain/debug.yaml"), overrides)
    local_cfg = dataclasses.replace(cfg.loader, decode="local")
    expected: dict[tuple[int, int], list[list[str]]] = {}
    for rank in range(2):
        loader, step = make_loader(local_cfg, PretrainTask(cfg).clip_spec(), rank=rank, world_size=2), 0
        while step < 12:
            for b in loader:
                step += 1
                expected[step, rank] = [
                    [k for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
                ]
                if step == 12:
                    break
        loader.close()
    assert trained == expected  # one attempt per step and rank (no restart), the local loader's keys


def test_elastic_pretraining_survives_losing_a_node(local_cluster, tmp_path):
    """Elastic pretraining (num_workers (1, 2), one worker per node) keeps going when the worker *node* dies
    (its `ray start` process group SIGKILLed: raylet, workers and all), finishes with the samples its schedule
    asks for, never trains on a sample twice within an epoch (the loader's guarantee across the resize), and
    grows back to 2 workers once the node rejoins (Ray Train V2's elastic resize)."""
    from jobs.train.metrics import read_metrics
    from tests.pipeline.shardset_helpers import make_shard_set

    shards = str(tmp_path / "shards")
    make_shard_set(shards, n_videos=32, n_shards=4, frames=16, width=64, height=48, pattern="moving")
    run, keys = tmp_path / "runs" / "elastic", tmp_path / "keys"
    # Pacing: Ray Train's controller takes one report (= one step here) per health-check poll, set to 1 s: after
    # the kill (at step ~4-6) the 1-worker run has >= (40 - 6) * 8 / 4 = 68 steps = >= 68 s left to outlast the
    # node's restart, rejoin and the resize (~10-30 s); tests/conftest.py's faster poll would not leave it that.
    # A 2-worker placement group asked for while the dead node still looks alive gives up after 10 s (Ray Train's
    # default: 60 s), then the controller retries with what it sees.
    env = [
        "--env",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=1",
        "--env",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=10",
    ]
    started = local_cluster.vmae(
        "submit", "--no-wait", *env, "--", "pretrain", "--config", "configs/pretrain/debug.yaml",
        f"loader.manifest={shards}/manifest.json", f"storage_path={tmp_path / 'runs'}", "name=elastic",
        "schedule.total_steps=40", "checkpoint.every_steps=2", "metrics.image_every=0", "scaling.min_workers=1",
        "scaling.elastic_resize_monitor_interval_s=5", "failure.max_failures=5", f"fault.keys_log={keys}",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    metrics = run / "logs" / "metrics.jsonl"

    def wait_for(what, ok, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = read_metrics(str(metrics)) if metrics.exists() else {}
            if ok(recs):
                return recs
            status = local_cluster.get(f"/api/jobs/{job_id}")["status"]
            assert status in ("PENDING", "RUNNING"), (
                what,
                status,
                local_cluster.get(f"/api/jobs/{job_id}/logs")["logs"][-3000:],
            )
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    wait_for("4 steps on 2 workers", lambda r: any(s >= 4 and x["world_size"] == 2 for s, x in r.items()))
    worker = local_cluster.procs[1]
    os.killpg(worker.pid, signal.SIGKILL)  # the whole node: raylet, its Ray Train worker, everything
    worker.wait()
    kill_time = time.time()
    wait_for("a step on 1 worker", lambda r: any(x["world_size"] == 1 for x in r.values()))
    temp = local_cluster.temp_dir
    local_cluster.procs[1] = _ray_start([f"--address={local_cluster.gcs}", f"--temp-dir={temp}/w2"],
                                        local_cluster.env, os.path.join(temp, "worker2.log"))  # fmt: skip
    done = local_cluster.vmae("logs", job_id, "--follow", timeout=400)
    status = local_cluster.vmae("status", job_id)
    assert "status: SUCCEEDED" in status.stdout, status.stdout + done.stdout[-3000:]
    recs = read_metrics(str(metrics))
    sizes = [int(r["world_size"]) for r in recs.values()]
    assert sizes[0] == 2 and 1 in sizes
    assert recs[max(recs)]["samples_seen"] == 40 * 8  # the schedule counts samples, whatever the world size
    assert 2 in sizes[sizes.index(1) :], f"no scale-up after the node rejoined: {sizes}"
    # the trajectory that counts: for each step, the ranks of the last attempt that trained it: its world size
    # is that of the step's latest record, and each of its ranks' latest record of the step is that attempt's
    # (the same step of an attempt lost with the node, e.g. on the dead rank 1 of a world of 2 before a world
    # of 1 retrained it, does not count)
    tried: dict[int, list[tuple[int, dict]]] = {}
    for path in keys.glob("rank_*.jsonl"):
        rank = int(path.name.split("_")[1].split("-")[0])
        for line in path.read_text().splitlines():
            r = json.loads(line)
            tried.setdefault(r["step"], []).append((rank, r))
    final: dict[tuple[int, int], dict] = {}
    for step, attempts in tried.items():
        world = max(attempts, key=lambda a: a[1]["t"])[1]["world"]
        for rank, r in attempts:
            if (
                rank < world
                and r["world"] == world
                and ((step, rank) not in final or final[step, rank]["t"] < r["t"])
            ):
                final[step, rank] = r
    by_epoch: dict[int, list[str]] = {}
    for (step, _), r in final.items():
        if step <= max(recs):
            by_epoch.setdefault(r["epoch"], []).extend(r["keys"])
    for epoch, seen in by_epoch.items():
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample trained on twice"
    assert any(r["t"] > kill_time and r["world"] == 1 for r in final.values())
