"""softmerge-loopback: a real deployment on Flower's runtime, on 127.0.0.1.

It starts one ``flower-superlink`` and N ``flower-supernode`` processes (each its own
partition), submits the app with ``flwr run``, kills one SuperNode once the first round
is checkpointed, and waits for the run to end. The verdict comes from ``flwr ls``
(``flwr run`` itself exits 0 even when the run fails) and from the run's results file.

Everything runs from a fresh temporary directory with its own ``FLWR_HOME``, so neither
the caller's working directory nor ``~/.flwr`` is touched, and every process it started
is stopped by PID (its whole process group) on the way out, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDERATION = "loopback"


def default_app_dir() -> Path:
    """The project directory (the Flower app), if this module runs from a source checkout."""
    return Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


class Deployment:
    """The processes of one loopback deployment; :meth:`stop` ends them all."""

    def __init__(self, workdir: Path, bin_dir: Path) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        self.env.update({
            "FLWR_HOME": str(workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # Flower's runtime starts flwr-serverapp / flwr-clientapp from PATH.
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        })

    def start(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        process = subprocess.Popen([str(self.bin_dir / arguments[0]), *arguments[1:]], cwd=self.workdir,
                                   env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.processes[name]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def flwr(self, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "flwr"), *arguments], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> list[int]:
        """Terminate every started process group; returns the PIDs still alive (should be none)."""
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return [p.pid for p in self.processes.values() if p.poll() is None]


def run_loopback(app_dir: Path, num_nodes: int = 3, rounds: int = 3, kill_node: int | None = 2,
                 round_timeout: float = 60.0, run_timeout: float = 1500.0, keep: bool = False) -> dict:
    """Deploy, run, kill a SuperNode mid-run, and report what ``flwr ls`` says."""
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} holds no pyproject.toml; pass --app with the project directory")
    workdir = Path(tempfile.mkdtemp(prefix="softmerge-loopback-"))
    deployment = Deployment(workdir, Path(sys.executable).parent)
    port = _free_port()
    (workdir / "flwr-home").mkdir()
    (workdir / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    output = workdir / "results"
    report: dict = {"workdir": str(workdir), "port": port, "killed_node": kill_node}
    started = time.monotonic()
    try:
        # No --database: the SuperLink keeps its state in memory, as the README's commands run it.
        deployment.start("superlink", ["flower-superlink", "--insecure", "--port", str(port),
                                       "--disable-runtime-dependency-installation"])
        if not _wait_for_port(port, 60):
            raise RuntimeError("the SuperLink did not open its port within 60 s")
        for node in range(num_nodes):
            deployment.start(f"supernode-{node}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(_free_port()),
                "--node-config", f"partition-id={node} num-partitions={num_nodes}"])
        run_config = (f"num-server-rounds={rounds} strategy='softmerge' attack='extreme' extreme-values='1e30' "
                      f"malicious-partitions='0' round-timeout={round_timeout} output-dir='{output}' "
                      "fraction-evaluate=0.0")
        submitted = deployment.flwr("run", str(app_dir), FEDERATION, "--run-config", run_config)
        match = re.search(r"started run (\d+)", submitted.stdout + submitted.stderr)
        if submitted.returncode != 0 or not match:
            raise RuntimeError(f"flwr run failed: {submitted.stdout[-1500:]} {submitted.stderr[-1500:]}")
        run_id = match.group(1)
        report["run_id"] = run_id

        status, details = "unknown", ""
        deadline = time.monotonic() + run_timeout
        while time.monotonic() < deadline:
            if kill_node is not None and "killed_after_round" not in report:
                rounds_done = _rounds_done(output)
                if rounds_done >= 1:
                    deployment.kill(f"supernode-{kill_node}")
                    report["killed_after_round"] = rounds_done
            listed = deployment.flwr("ls", FEDERATION, "--run-id", run_id, "--format", "json", timeout=60)
            try:
                run = json.loads(listed.stdout)["runs"][0]
                status, details = run["status"], run.get("status-details", "")
            except (json.JSONDecodeError, KeyError, IndexError):
                pass
            if status.startswith("finished"):
                break
            time.sleep(2)
        report.update(status=status, status_details=details, seconds=round(time.monotonic() - started, 1))
        results = output / "results.json"
        if results.is_file():
            data = json.loads(results.read_text())
            report["results_status"] = data["status"]
            report["accuracy"] = [entry["test_accuracy"] for entry in data["rounds"]]
            report["candidates"] = [entry["gates"]["candidates"] for entry in data["rounds"][1:] if "gates" in entry]
            report["malicious_weight"] = [
                sum(row[entry["gates"]["candidates"].index("client-0")] for row in entry["gates"]["weights"])
                if "client-0" in entry["gates"]["candidates"] else None
                for entry in data["rounds"][1:] if "gates" in entry]
    finally:
        report["left_running"] = deployment.stop()
        if not keep and not report["left_running"]:
            shutil.rmtree(workdir, ignore_errors=True)
    report["ok"] = (report.get("status") == "finished:completed" and report.get("results_status") == "finished"
                    and len(report.get("accuracy", [])) == rounds + 1 and not report["left_running"]
                    and (kill_node is None or "killed_after_round" in report))
    return report


def _rounds_done(output: Path) -> int:
    try:
        return json.loads((output / "checkpoint.json").read_text())["round"]
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softmerge-loopback", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", type=Path, default=default_app_dir(), help="the project directory")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kill-node", type=int, default=2, help="SuperNode to kill after round 1 (-1: none)")
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory with all logs")
    args = parser.parse_args(argv)
    if args.nodes < 2 or not -1 <= args.kill_node < args.nodes:
        print("softmerge-loopback: need --nodes >= 2 and -1 <= --kill-node < --nodes", file=sys.stderr)
        return 2
    report = run_loopback(args.app.resolve(), args.nodes, args.rounds,
                          None if args.kill_node < 0 else args.kill_node, args.round_timeout, keep=args.keep)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
