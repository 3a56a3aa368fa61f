"""Run vLLM's OpenAI-compatible server on loopback and read greedy completions from it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import requests

VENV = Path(os.environ.get("VLLM_OVERLAY_VENV", sys.prefix))
HOST = "127.0.0.1"
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": HOST,  # torch.distributed rendezvous on loopback too
}
# Small and fast to start: no torch.compile, a short context, few sequences.
SERVE_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager"]
STARTUP_TIMEOUT = 300.0
SHUTDOWN_GRACE = 60.0

# (server log name, seconds until healthy) of every server this process started.
startups: list[tuple[str, float]] = []


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    startup_seconds: float = 0.0
    family: list[psutil.Process] = field(default_factory=list)  # filled in at shutdown

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=60)

    def post(self, path: str, payload) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=120)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def survivors(self) -> list[psutil.Process]:
        return [p for p in self.family if _alive(p)]


@dataclass(frozen=True)
class Completion:
    tokens: list[int]
    logprobs: list[float]
    top: list[dict[int, float]]  # per position: token id -> logprob, sampled token included


def vllm_serve(model: Path, *extra: str) -> list[str]:
    """The command a user runs with the patched wheel installed."""
    return [
        str(VENV / "bin/vllm"),
        "serve",
        str(model),
        "--served-model-name",
        model.name,
        *SERVE_FLAGS,
        *extra,
    ]


def upstream_api_server(model: Path) -> list[str]:
    # vllm-cpu's `vllm serve` asks for the metadata of a distribution named vllm.
    return [
        str(VENV / "bin/python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        model.name,
        *SERVE_FLAGS,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Not this test run's own variables: the server imports only what is installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VLLM_OVERLAY_")}
    return {**env, **SERVER_ENV, **(extra or {})}


def start_server(command: list[str], log: Path, env: dict[str, str]) -> Server:
    """`command` (a vLLM server without --host/--port) started on a free loopback port,
    in a process group of its own; not waited for (see wait_until_healthy, stop)."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--host", HOST, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Server(process, f"http://{HOST}:{port}", log)


@contextmanager
def running_server(command: list[str], log: Path, env: dict[str, str]) -> Iterator[Server]:
    """`command` (a vLLM server without --host/--port) serving on a free loopback
    port; on exit the whole process group is stopped, whatever happened."""
    server = start_server(command, log, env)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        stop(server)


def wait_until_healthy(server: Server, timeout: float = STARTUP_TIMEOUT) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/health", timeout=5).status_code == 200:
                server.startup_seconds = time.monotonic() - started
                startups.append((server.log.stem, server.startup_seconds))
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no /health within {timeout:.0f} s:\n{server.log_tail()}")


def stop(server: Server) -> None:
    """SIGTERM to the server's process group (API server, engine core, workers),
    then SIGKILL to whatever is left after the grace period."""
    process = server.process
    server.family = group_members(process.pid)
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(SHUTDOWN_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(server.survivors(), timeout=SHUTDOWN_GRACE)
    for leftover in alive:
        leftover.kill()
    psutil.wait_procs(alive, timeout=10)


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for candidate in psutil.process_iter():
        try:
            if os.getpgid(candidate.pid) == pgid:
                members.append(candidate)
        except ProcessLookupError:
            pass
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def greedy_choice(server: Server, model: str, prompt, max_tokens: int, top_k: int, **extra) -> dict:
    """The choice of a greedy /v1/completions (token ids, top_k logprobs at each step, and
    what `extra` asks for besides)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": top_k,
        "return_tokens_as_token_ids": True,
        **extra,
    }
    response = server.post("/v1/completions", body)
    response.raise_for_status()
    return response.json()["choices"][0]


def greedy_completion(server: Server, model: str, prompt, max_tokens: int, top_k: int) -> Completion:
    """Greedy tokens of /v1/completions with the top_k logprobs at each step."""
    return parse_logprobs(greedy_choice(server, model, prompt, max_tokens, top_k)["logprobs"])


@dataclass(frozen=True)
class Echoed:
    """A greedy completion echoed after its prompt: every token, and at each position but
    the first the logprobs the server gave there (its top k and the token itself)."""

    tokens: list[int]
    prompt_len: int
    top: list[dict[int, float]]  # top[j - 1]: the logprobs of position j

    def generated(self) -> Completion:
        tokens = self.tokens[self.prompt_len :]
        top = self.top[self.prompt_len - 1 :]
        return Completion(tokens, [step[t] for t, step in zip(tokens, top)], top)


def echoed_completion(server: Server, model: str, prompt: list[int], max_tokens: int, top_k: int) -> Echoed:
    """Greedy tokens of /v1/completions with the prompt echoed: the top_k logprobs at
    every prompt and generated position but the first."""
    logprobs = greedy_choice(server, model, prompt, max_tokens, top_k, echo=True)["logprobs"]
    tokens = [token_id(t) for t in logprobs["tokens"]]
    assert tokens[: len(prompt)] == prompt and logprobs["top_logprobs"][0] is None, logprobs
    top = [{token_id(t): lp for t, lp in step.items()} for step in logprobs["top_logprobs"][1:]]
    return Echoed(tokens, len(prompt), top)


def parse_logprobs(logprobs: dict) -> Completion:
    """The completions API's logprobs, with "token_id:N" strings turned into ids."""
    return Completion(
        tokens=[token_id(t) for t in logprobs["tokens"]],
        logprobs=list(logprobs["token_logprobs"]),
        top=[{token_id(t): lp for t, lp in step.items()} for step in logprobs["top_logprobs"]],
    )


def token_id(token: str) -> int:
    prefix, _, number = token.partition(":")
    assert prefix == "token_id", token
    return int(number)


def transformers_greedy(model, prompt_ids: list[int], max_tokens: int, top_k: int) -> Completion:
    """Greedy tokens of a transformers causal LM, with the top_k logprobs at each step."""
    import torch

    ids, tokens, logprobs, top = list(prompt_ids), [], [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            step = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().log_softmax(-1)
            token = int(step.argmax())
            best = step.topk(top_k)
            tokens.append(token)
            logprobs.append(float(step[token]))
            top.append(dict(zip(best.indices.tolist(), best.values.tolist())))
            ids.append(token)
    return Completion(tokens, logprobs, top)


def assert_logprobs_close(reference: Completion, tested: Completion, atol: float) -> None:
    """Like vLLM's check_logprobs_close: equal greedy tokens with logprobs within
    atol, up to a first divergence where each side's token must be among the
    other's top logprobs (a near-tie); the sequences may differ after it."""
    assert len(reference.tokens) == len(tested.tokens)
    for step, (ref_token, token) in enumerate(zip(reference.tokens, tested.tokens)):
        if ref_token != token:
            assert ref_token in tested.top[step] and token in reference.top[step], (
                f"step {step}: reference chose {ref_token} (top {reference.top[step]}), "
                f"tested chose {token} (top {tested.top[step]})"
            )
            return
        assert abs(reference.logprobs[step] - tested.logprobs[step]) <= atol, (
            f"step {step}, token {token}: logprob {tested.logprobs[step]} "
            f"vs reference {reference.logprobs[step]}"
        )
