"""The warm interpreter that local training jobs fork from behaves as a new process would:
the job's own argv, environment, working directory, stdout and stderr, its exit status
(negative for a signal) and a pid that can be killed, and concurrent jobs."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from avatarflow_local import forkserver

PROGRAM = textwrap.dedent("""
    import os, sys, time
    print("argv", sys.argv[1:] if len(sys.argv) > 1 else sys.argv[0].endswith("job.py"))
    print("env", os.environ.get("JOB_VALUE"), os.environ.get("LEAK"))
    print("cwd", os.getcwd())
    print("to stderr", file=sys.stderr)
    action = os.environ.get("JOB_ACTION", "")
    if action == "sleep":
        time.sleep(60)
    if action == "raise":
        raise RuntimeError("boom")
    if action == "kill-self":
        os.kill(os.getpid(), 9)
    sys.exit(int(os.environ.get("JOB_CODE", "0")))
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server without the ML preload (the training tests use the real one)."""
    folder = tmp_path_factory.mktemp("fork")
    program = folder / "job.py"
    program.write_text(PROGRAM)
    server = forkserver._Server(dict(os.environ), preload=())
    yield server, program, folder
    server.close()


def run(server, program, env, timeout=30):
    with tempfile.TemporaryFile(mode="w+") as errors:
        read_fd, write_fd = os.pipe()
        conn = server.start([str(program)], env, write_fd, errors.fileno())
        os.close(write_fd)
        proc = forkserver.WarmProcess(conn, os.fdopen(read_fd, "r", buffering=1))
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        out = proc.stdout.read()
        errors.seek(0)
        return code, out, errors.read()


def test_a_job_has_its_own_environment_output_and_exit_code(server, monkeypatch, tmp_path):
    srv, program, _ = server
    monkeypatch.chdir(tmp_path)
    code, out, err = run(srv, program, {**os.environ, "JOB_VALUE": "first", "JOB_CODE": "3"})
    assert code == 3
    assert "env first None" in out and f"cwd {tmp_path}" in out and "argv True" in out
    assert err.strip() == "to stderr"
    # Nothing of the first job's environment reaches the next one.
    code, out, _ = run(srv, program, {**os.environ, "JOB_VALUE": "second"})
    assert code == 0 and "env second None" in out


def test_an_uncaught_error_is_exit_code_one_with_its_traceback(server):
    srv, program, _ = server
    code, _, err = run(srv, program, {**os.environ, "JOB_ACTION": "raise"})
    assert code == 1 and "RuntimeError: boom" in err


def test_a_killed_job_reports_the_signal_like_popen(server):
    srv, program, _ = server
    code, _, _ = run(srv, program, {**os.environ, "JOB_ACTION": "kill-self"})
    assert code == -signal.SIGKILL
    code, _, _ = run(srv, program, {**os.environ, "JOB_ACTION": "sleep"}, timeout=1)
    assert code == -signal.SIGKILL  # killed by its pid after the timeout, as training_job does


def test_jobs_run_concurrently(server):
    """Two sleeping jobs at once: the server does not wait for one before forking the next."""
    srv, program, _ = server
    with tempfile.TemporaryFile(mode="w+") as errors:
        procs = []
        for _ in range(2):
            read_fd, write_fd = os.pipe()
            conn = srv.start([str(program)], {**os.environ, "JOB_ACTION": "sleep"}, write_fd, errors.fileno())
            os.close(write_fd)
            procs.append(forkserver.WarmProcess(conn, os.fdopen(read_fd, "r")))
        assert len({p.pid for p in procs}) == 2
        for p in procs:
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(0.2)
            p.kill()
        assert [p.wait(10) for p in procs] == [-signal.SIGKILL] * 2
        for p in procs:
            p.stdout.close()


def test_import_time_variables_choose_the_server():
    """A job whose threads or hub settings differ must not reuse an interpreter that
    imported torch under other settings; per-job variables do not matter."""
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert forkserver._import_env({**base, "SM_MODEL_DIR": "/a"}) == forkserver._import_env(base)
    assert forkserver._import_env({**base, "OMP_NUM_THREADS": "2"}) != forkserver._import_env(base)
    assert forkserver._import_env({**base, "HF_HUB_OFFLINE": "1"}) != forkserver._import_env(base)


@pytest.mark.e2e  # starts and kills a process tree: seconds
def test_the_server_exits_with_the_process_that_started_it(tmp_path):
    code = ("import os, sys; from avatarflow_local import forkserver; "
            "s = forkserver._Server(dict(os.environ), preload=()); "
            "print(s.proc.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        __import__("time").sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the fork server outlived its parent")
