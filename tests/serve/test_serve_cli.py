"""`gptjax serve` as a process: it serves a run to the openai client, a server killed
mid-stream leaves the client with a clean error and the run untouched, and bad command
lines are one line with exit 2."""

import hashlib
import os
import signal
import socket
import subprocess
import sys

import openai
import pytest
from conftest import REPO, byte_base, fails_cleanly


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_killed_mid_stream_gives_a_clean_error_and_changes_nothing(tmp_path, corpus_file):
    run = byte_base(tmp_path, corpus_file) / "base"
    before = _digest(run)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", "--run", str(run), "--port",
                               str(port), "--max-batch", "2"], cwd=REPO, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        started = ""
        while "on http://" not in started:
            line = server.stderr.readline()
            assert line, f"the server exited: {started}"
            started += line
        assert "base on http://127.0.0.1" in started and "transcript chat template" in started
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="base", prompt="Hi", max_tokens=3).choices[0].text is not None
        stream = client.completions.create(model="base", prompt="Hi", max_tokens=170, stream=True,
                                           temperature=1.0, seed=1)
        with pytest.raises((openai.APIError, ConnectionError)):
            for i, _ in enumerate(stream):
                if i == 1:
                    server.send_signal(signal.SIGKILL)
                    server.wait(10)
        log = server.stderr.read()
        assert '"endpoint": "/v1/completions"' in log and '"status": 200' in log
        assert '"prompt"' not in log  # prompts stay out of the log unless --log-prompts
    finally:
        server.kill()
        server.wait(10)
    assert _digest(run) == before


def test_a_port_in_use_is_one_line(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        fails_cleanly(capsys, "serve", "--run", str(tmp_path), "--port", str(port),
                      match=f"port {port} on 127.0.0.1 is in use")


@pytest.mark.parametrize("flags, match", [
    (["--run", "not-a-run", "--port", "0"], "not-a-run is not a gptjax run"),
    (["--run", "x", "--max-batch", "0"], "--max-batch and --max-body-bytes must be positive"),
    (["--run", "x", "--port", "70000"], "--port 70000: ports are 0..65535"),
    (["--run", "x", "--api-key-env", "GPTJAX_NO_SUCH_VARIABLE"], "that environment variable is empty"),
])
def test_bad_serve_command_lines_are_one_line(capsys, flags, match):
    fails_cleanly(capsys, "serve", *flags, match=match)
