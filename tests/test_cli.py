"""The ``triptych`` command: help for every flag, environment and config-file fallbacks, one
line for what it refuses, and ``triptych serve`` bringing up each topology."""

import argparse
import base64
import dataclasses
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.stack import FAST_MOCK, ROOT, SERVING, Stack, start_topology
from triptych.cli.serve import flags as serve_flags
from triptych.components.decode_worker.__main__ import parser as decode_parser
from triptych.components.encode_worker.__main__ import parser as encode_parser
from triptych.components.frontend.config import FrontendConfig, ImageLimits, VideoLimits
from triptych.components.prefill_worker.__main__ import parser as prefill_parser
from triptych.components.worker import WorkerConfig, worker_config
from triptych.engines import EngineConfig
from triptych.engines.mock import MockConfig
from triptych.runtime import RuntimeConfig
from triptych.runtime.flags import FlagParser, primary_flag, settable
from triptych.runtime.nats_server import NatsServer

TRIPTYCH = str(Path(sys.executable).parent / "triptych")
PARSERS: dict[str, Callable[[], FlagParser]] = {
    "serve": lambda: serve_flags().parser,
    "frontend": FrontendConfig.parser,
    "encode": encode_parser,
    "prefill": prefill_parser,
    "decode": decode_parser,
}


@pytest.mark.parametrize("command", list(PARSERS))
def test_every_flag_has_help_a_default_and_an_environment_variable(command: str) -> None:
    parser = PARSERS[command]()
    text = parser.format_help()
    flat = " ".join(text.split())
    for action in settable(parser):
        assert action.help and len(action.help) > 10, f"{command} {action.option_strings}"
        flag = primary_flag(action)
        variable = "TRIPTYCH_" + flag.lstrip("-").replace("-", "_").upper()
        entry = flat[flat.index(f"{flag} ") :]
        assert re.match(rf"\S+ .*?\(default: [^;]+; env {variable}\)", entry), (command, flag)


def test_the_command_prints_help_for_each_command() -> None:
    top = subprocess.run([TRIPTYCH, "--help"], capture_output=True, text=True, check=True)
    for command in PARSERS:
        assert f"  {command} " in top.stdout
    for command in PARSERS:
        shown = subprocess.run(
            [TRIPTYCH, command, "--help"], capture_output=True, text=True, check=True
        )
        assert shown.stdout.startswith(f"usage: triptych {command}")
        assert "--config FILE.yaml" in shown.stdout


def test_sglang_names_are_aliases() -> None:
    args = decode_parser().parse_args(["--context-length", "2048", "--mem-fraction-static", "0.5"])
    assert (args.max_model_len, args.mem_fraction_static) == (2048, 0.5)
    args = FrontendConfig.parser().parse_args(["--host", "0.0.0.0", "--port", "9000"])
    assert (args.http_host, args.http_port) == ("0.0.0.0", 9000)


def _flag_and_value(field: dataclasses.Field[Any]) -> tuple[str, Any]:
    """A setting's first flag and a value other than its default."""
    flag = (field.metadata["flags"] or ("--" + field.name.replace("_", "-"),))[0]
    choices = field.metadata["argument"].get("choices")
    if choices:
        return flag, next(choice for choice in choices if choice != field.default)
    if isinstance(field.default, float):
        return flag, field.default + 0.25
    if isinstance(field.default, int) or field.name == "kv_cache_tokens":  # int | None
        return flag, (field.default or 0) + 7
    return flag, f"set-{field.name}"


def test_each_setting_flag_reaches_its_config_field(tiny_model: Path) -> None:
    """Every config field declared with `setting` is a flag whose value lands in that field."""

    def set_all(*configs: type) -> tuple[list[str], dict[tuple[type, str], Any]]:
        argv, wanted = [], {}
        for config in configs:
            for field in dataclasses.fields(config):
                if "help" in field.metadata:
                    flag, value = _flag_and_value(field)
                    argv += [flag, str(value)]
                    wanted[config, field.name] = value
        return argv, wanted

    argv, wanted = set_all(FrontendConfig, ImageLimits, VideoLimits, RuntimeConfig)
    frontend = FrontendConfig.from_args(FrontendConfig.parser().parse_args(argv), "m", "m")
    argv, more = set_all(WorkerConfig, EngineConfig, MockConfig)
    args = decode_parser().parse_args([*argv, "--model-path", str(tiny_model)])
    worker = worker_config(args, "decode")
    held = {
        FrontendConfig: frontend,
        ImageLimits: frontend.images,
        VideoLimits: frontend.videos,
        RuntimeConfig: frontend.runtime,
        WorkerConfig: worker,
        EngineConfig: worker.engine,
        MockConfig: worker.engine.mock,
    }
    assert len(wanted) + len(more) > 40
    for (config, name), value in {**wanted, **more}.items():
        assert getattr(held[config], name) == value, (config.__name__, name)


def test_command_line_beats_environment_beats_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "frontend.yaml"
    config.write_text(
        "http-port: 9001\nmax_images: 3\ndisable-access-log: true\nlog-level: debug\n"
    )
    monkeypatch.setenv("TRIPTYCH_HTTP_PORT", "9002")
    monkeypatch.setenv("TRIPTYCH_REQUEST_TIMEOUT_S", "12.5")
    args = FrontendConfig.parser().parse_args(["--config", str(config)])
    assert args.http_port == 9002  # the environment wins over the file
    assert args.max_images == 3 and args.disable_access_log and args.log_level == "DEBUG"
    assert args.request_timeout_s == 12.5
    args = FrontendConfig.parser().parse_args(["--config", str(config), "--http-port", "9003"])
    assert args.http_port == 9003  # the command line wins over both
    monkeypatch.setenv("TRIPTYCH_CONFIG", str(config))
    assert FrontendConfig.parser().parse_args([]).max_images == 3


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"TRIPTYCH_HTTP_PORT": "eighty"}, "'eighty' is not a valid value for --http-port"),
        ({"TRIPTYCH_TOPOLOGY": "E/X"}, "TRIPTYCH_TOPOLOGY: 'E/X' is not one of"),
        ({"TRIPTYCH_DISABLE_ACCESS_LOG": "maybe"}, "expected true or false"),
    ],
)
def test_bad_environment_values_are_one_line(
    setting: dict[str, str],
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        FrontendConfig.parser().parse_args([])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_unknown_config_keys_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("http-prot: 80\n")
    with pytest.raises(SystemExit):
        FrontendConfig.parser().parse_args(["--config", str(config)])
    assert "'http-prot' is not a flag of triptych frontend" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["decode", "--engine", "mock"], ["serve", "--engine", "mock"]])
def test_tensor_parallelism_is_refused_in_one_line(command: list[str]) -> None:
    done = subprocess.run(
        [TRIPTYCH, *command, "--tp", "2"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "--tp 2: tensor parallelism is not supported yet" in done.stderr


@contextmanager
def held_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_port_is_one_line(nats_server: NatsServer) -> None:
    with held_port() as port:
        serve = subprocess.run(
            [TRIPTYCH, "serve", "--engine", "mock", "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        env = {**os.environ, "NATS_URL": nats_server.url, "TRIPTYCH_NAMESPACE": "busy-port"}
        frontend = subprocess.run(
            [TRIPTYCH, "frontend", "--http-port", str(port), "--log-level", "warning"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
    for done in (serve, frontend):
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert f"port {port} on 127.0.0.1 is already in use" in done.stderr


@contextmanager
def serving(
    args: list[str], log: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`triptych serve ARGS` in a session of its own (as from a terminal), once it serves."""
    process = subprocess.Popen(
        [TRIPTYCH, "serve", "--http-port", "0", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        found = None
        while time.monotonic() < deadline and process.poll() is None and not found:
            found = SERVING.search(log.read_text())
            time.sleep(0.2)
        assert found, log.read_text()
        yield process, found[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def environment(fast: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    return {**env, **FAST_MOCK} if fast else env


def ctrl_c(process: subprocess.Popen[bytes], log: Path) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(60) == 0
    output = log.read_text()
    assert "Traceback" not in output, output
    assert not [line for line in output.splitlines() if " ERROR " in line], output
    assert "stopping triptych..." in output


@pytest.mark.parametrize("topology", ["e/pd", "epd", "p/d"])
def test_serve_starts_each_topology(topology: str, tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"topology: {topology}\nengine: mock\nserved-model-name: friendly\n")
    log = tmp_path / "serve.log"
    with serving(["--config", str(config)], log, environment()) as (process, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["friendly"]
        reply = client.chat.completions.create(
            model="friendly", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        expected = {"e/pd": {"encode", "decode"}, "epd": {"decode"}, "p/d": {"prefill", "decode"}}
        ready = httpx.get(f"{url}/ready", timeout=10).json()
        assert ready["topology"] == topology.upper()
        assert set(ready["instances"]) == expected[topology]
        ctrl_c(process, log)


def readme_curl() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"```bash\n(curl http://127\.0\.0\.1:8000/v1/chat/completions.*?)```", readme, re.S
    )
    assert block, "the README has no curl example"
    return block[1]


def test_serve_e_p_d_streams_at_realistic_mock_costs_and_the_readme_curl_works(
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    with serving(["--topology", "e/p/d", "--engine", "mock"], log, environment(fast=False)) as (
        process,
        url,
    ):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="tiny-qwen2.5-vl",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        chunks = [c for c in stream if c.choices and c.choices[0].model_extra.get("token_ids")]
        assert len(chunks) == 8  # the mock's default decode step: one token per chunk
        curl = readme_curl().replace("http://127.0.0.1:8000", url)
        done = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert '"finish_reason":"length"' in done.stdout and done.stdout.rstrip().endswith(
            "data: [DONE]"
        ), done.stdout
        ctrl_c(process, log)


def test_help_of_serve_lists_component_flags() -> None:
    parser = serve_flags().parser
    names = {a.dest for a in settable(parser)}
    assert {"api_key", "chat_template", "max_running_requests", "engine", "revision"} <= names
    assert isinstance(parser, argparse.ArgumentParser)


class CommandStack(Stack):
    """A stack whose processes are the ``triptych`` command's components, as a user runs them
    one per terminal (or per container)."""

    COMMANDS = {
        "encode_worker": "encode",
        "prefill_worker": "prefill",
        "decode_worker": "decode",
        "frontend": "frontend",
    }

    def command(self, module: str, *args: str) -> list[str]:
        return [TRIPTYCH, self.COMMANDS[module], *args]


def test_one_component_per_command_makes_a_stack(
    nats_server: NatsServer, tmp_path: Path, tiny_model: Path
) -> None:
    """``triptych encode``, ``prefill``, ``decode`` and ``frontend``, each started on its own,
    serve E/P/D together: a chat with an image crosses all four."""
    stack = CommandStack(nats_server.url, tmp_path)
    try:
        start_topology(stack, "E/P/D", model_path=str(tiny_model))
        picture = io.BytesIO()
        Image.new("RGB", (56, 56), (200, 30, 30)).save(picture, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny-qwen2.5-vl",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ],
            max_tokens=3,
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert reply.usage.prompt_tokens > 4  # the image's tokens, expanded by the frontend
        scraped = httpx.get(f"{stack.url}/metrics", timeout=10).text
        assert "triptych_frontend_images_per_request_sum 1.0" in scraped.splitlines()
        for process in reversed(stack.processes):  # frontend first, as an operator would
            assert process.terminate(timeout=60) == 0, process.output()[-2000:]
    finally:
        stack.stop()


def test_each_topology_starts_a_worker_for_every_component_it_calls() -> None:
    """The one topology table: the workers serve and pin by what it says; encode sends to the
    component that generates, text skips the encoder."""
    from triptych.components.topology import GENERATES, TOPOLOGIES

    dests = {action.dest for action in serve_flags().parser._actions}
    for name, topology in TOPOLOGIES.items():
        entered = {worker.module.removesuffix("_worker") for worker in topology.workers}
        assert entered == set(topology.components), name
        assert all(worker.gpu in dests for worker in topology.workers), name
        assert topology.text_entry in topology.components and GENERATES in topology.components
    assert [t.entry for t in TOPOLOGIES.values()] == ["encode", "encode", "decode", "decode"]
    assert TOPOLOGIES["E/P/D"].text_entry == "decode"
