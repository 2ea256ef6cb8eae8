"""The bad-input matrix of ``tests/test_hardening.py`` (issue #14): one row per thing a user gets wrong.

A row names the tool, its arguments (``{export}`` is a fresh copy of the tiny export, ``{tmp}`` the
test's folder, which is also the working folder), a setup that damages that copy or its surroundings,
and a fragment of the one-line message. ``before`` says how early the refusal must come: ``"hash"``
before any file is hashed (and anything loaded), ``"load"`` before any graph or model is loaded, ``None``
whenever. API rows hold a call instead of arguments and the exception type it must raise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tgate_trt.contract.errors import OutputError, UsageError, UserError
from tgate_trt.manifest import ManifestError


@dataclass
class Ctx:
    """What a row's setup and arguments see; ``cleanups`` run after the row (locks, immutable flags)."""

    tmp: Path
    export: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def path(self, rel: str) -> Path:
        return Path(self.fmt(rel))

    def fmt(self, text: str) -> str:
        return text.replace("{export}", str(self.export)).replace("{tmp}", str(self.tmp))


Setup = Callable[[Ctx], None]


@dataclass
class Case:
    tool: str  # export, run, quantize, build (OpenVINO), build-trt, api
    name: str
    args: list[str | bytes] = field(default_factory=list)
    message: str = ""
    setup: Setup | tuple[Setup, ...] = ()
    before: str | None = "hash"
    code: int = 2
    call: Callable[..., Any] | None = None  # API rows: call(ctx, pipe)
    exc: type[BaseException] | None = None  # API rows
    needs_pipe: bool = False  # API rows that call a loaded pipeline

    @property
    def id(self) -> str:
        return f"{self.tool}-{self.name}"

    def prepare(self, ctx: Ctx) -> None:
        for step in self.setup if isinstance(self.setup, tuple) else (self.setup,):
            step(ctx)


# --- setups --------------------------------------------------------------------------------------
def edit_manifest(change: Callable[[dict[str, Any]], Any]) -> Setup:
    """Apply ``change`` to the copy's manifest.json (a return value other than None replaces it)."""

    def setup(ctx: Ctx) -> None:
        path = ctx.export / "manifest.json"
        data = json.loads(path.read_text())
        new = change(data)
        path.write_text(json.dumps(data if new is None else new, indent=2))

    return setup


def write(rel: str, text: str | bytes = "x") -> Setup:
    def setup(ctx: Ctx) -> None:
        path = ctx.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def append(rel: str, text: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        with open(ctx.path(rel), "a") as fh:
            fh.write(text)

    return setup


def flip_byte(rel: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        path = ctx.path(rel)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    return setup


def delete(rel: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        path = ctx.path(rel)
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return setup


def mkdir(rel: str, marker: bool = False) -> Setup:
    """A folder; with ``marker`` it looks like a previous output of ours (so --force alone can't be the refusal)."""

    def setup(ctx: Ctx) -> None:
        path = ctx.path(rel)
        path.mkdir(parents=True, exist_ok=True)
        if marker:
            (path / ".tgate-trt").write_text('{"tool": "tgate-trt"}\n')

    return setup


def symlink(rel: str, target: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        ctx.path(rel).symlink_to(ctx.path(target))

    return setup


def fake_model(rel: str) -> Setup:
    """A local diffusers-looking folder (refused before it is ever read)."""

    def setup(ctx: Ctx) -> None:
        folder = ctx.path(rel)
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text("{}")

    return setup


def readonly(rel: str) -> Setup:
    """A folder nobody may write: mode 0555, and immutable when we are root (root ignores modes)."""

    def setup(ctx: Ctx) -> None:
        import pytest

        path = ctx.path(rel)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        ctx.cleanups.append(lambda: path.chmod(0o755))
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
                pytest.skip("root without chattr +i: nothing is read-only to us")
            ctx.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))

    return setup


def hold_lock(out: str) -> Setup:
    """Another writer of ``out``: the advisory lock held by this (the test) process."""

    def setup(ctx: Ctx) -> None:
        target = ctx.path(out)
        lock = target.parent / f".{target.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)

        def release() -> None:
            with contextlib.suppress(OSError):
                os.close(fd)

        ctx.cleanups.append(release)

    return setup


def fake_quantized(data: dict[str, Any]) -> None:
    data["extra"]["quantization"] = {"method": "dynamic int8 (onnxruntime.quantization.quantize_dynamic)"}


def drop_cache_layer(data: dict[str, Any]) -> None:
    data["cache_layers"].pop()


def add_cache_layer(data: dict[str, Any]) -> None:
    last = dict(data["cache_layers"][-1])
    last["index"] += 1
    last["name"] = f"cache_{last['index']:02d}"
    data["cache_layers"].append(last)


def set_path(keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """``set_path("defaults.steps", 0)``; a value of ``DELETE`` removes the key."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = keys.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return change


DELETE = object()
TRT_MISSING = "pip install -e '.[tensorrt]' in a clone on the GPU host"  # not installed, or only its type stubs
EXPORT = "{export}"
OUT = "{tmp}/out"

# --- tgate-export ----------------------------------------------------------------------------------
E = "export"
EXPORT_CASES = [
    Case(E, "dtype", ["--model", "tiny", "--out", OUT, "--dtype", "fp64"], "--dtype must be one of fp32, fp16"),
    Case(E, "opset-low", ["--model", "tiny", "--out", OUT, "--opset", "17"], "--opset must be between 18 and 20"),
    Case(E, "height-zero", ["--model", "tiny", "--out", OUT, "--height", "0"], "--height must be an integer >= 1"),
    Case(E, "width-negative", ["--model", "tiny", "--out", OUT, "--width", "-64"], "--width must be an integer >= 1"),
    Case(E, "height-not-multiple", ["--model", "tiny", "--out", OUT, "--height", "70"], "must be a multiple of"),
    Case(
        E,
        "size-over-cap",
        ["--model", "tiny", "--out", OUT, "--height", "4096", "--width", "4096"],
        "pixels, over 65,536",
    ),
    Case(E, "schedule-unknown", ["--model", "tiny", "--out", OUT, "--schedule", "v3"], "--schedule"),
    Case(E, "height-not-int", ["--model", "tiny", "--out", OUT, "--height", "1e3"], "invalid int value"),
    Case(E, "out-missing", ["--model", "tiny"], "the following arguments are required: --out"),
    Case(
        E,
        "lcm-lora-missing",
        ["--model", "tiny", "--out", OUT, "--lcm-lora", "{tmp}/nope.safetensors"],
        "is not a .safetensors file",
    ),
    Case(E, "config-missing", ["--model", "tiny", "--out", OUT, "--config", "{tmp}/nope"], "is not a folder"),
    Case(
        E,
        "random-weights-not-preset",
        ["--model", "org/name", "--random-weights", "--out", OUT],
        "--random-weights needs a preset",
        before="load",
    ),
    Case(E, "unknown-preset", ["--model", "sd99", "--out", OUT], "unknown model 'sd99'", before="load"),
    Case(E, "model-path-missing", ["--model", "{tmp}/nope/model", "--out", OUT], "does not exist", before="load"),
    Case(
        E,
        "model-folder-not-sd",
        ["--model", "{tmp}/notsd", "--out", OUT],
        "not a diffusers pipeline folder",
        setup=write("{tmp}/notsd/readme.txt", "hi"),
        before="load",
    ),
    Case(E, "out-not-empty", ["--model", "tiny", "--out", OUT], "pass --force", setup=write(OUT + "/keep.txt")),
    Case(
        E,
        "force-not-ours",
        ["--model", "tiny", "--out", OUT, "--force"],
        "not an output of tgate-trt",
        setup=write(OUT + "/keep.txt"),
    ),
    Case(
        E,
        "force-onto-model-parent",
        ["--model", "{tmp}/models/my-sd", "--out", "{tmp}/models", "--force"],
        "which this command reads",
        setup=(mkdir("{tmp}/models", marker=True), fake_model("{tmp}/models/my-sd")),
    ),
    Case(
        E,
        "force-onto-model",
        ["--model", "{tmp}/models/my-sd", "--out", "{tmp}/models/my-sd", "--force"],
        "which this command reads",
        setup=(fake_model("{tmp}/models/my-sd"), mkdir("{tmp}/models/my-sd", True)),
    ),
    Case(
        E,
        "out-inside-model",
        ["--model", "{tmp}/models/my-sd", "--out", "{tmp}/models/my-sd/onnx"],
        "which this command reads",
        setup=fake_model("{tmp}/models/my-sd"),
    ),
    Case(
        E,
        "force-symlink-to-model",
        ["--model", "{tmp}/models/my-sd", "--out", "{tmp}/link", "--force"],
        "which this command reads",
        setup=(
            fake_model("{tmp}/models/my-sd"),
            mkdir("{tmp}/models/my-sd", True),
            symlink("{tmp}/link", "{tmp}/models/my-sd"),
        ),
    ),
    Case(
        E,
        "force-onto-config",
        ["--model", "tiny", "--config", "{tmp}/cfg", "--out", "{tmp}/cfg", "--force"],
        "which this command reads",
        setup=mkdir("{tmp}/cfg", marker=True),
    ),
    Case(E, "force-cwd", ["--model", "tiny", "--out", ".", "--force"], "is or contains the current folder"),
    Case(E, "force-cwd-parent", ["--model", "tiny", "--out", "..", "--force"], "is or contains the current folder"),
    Case(
        E,
        "out-parent-is-file",
        ["--model", "tiny", "--out", "{tmp}/afile/out"],
        "which is a file",
        setup=write("{tmp}/afile"),
    ),
    Case(
        E,
        "out-grandparent-is-file",
        ["--model", "tiny", "--out", "{tmp}/afile/sub/out"],
        "which is a file",
        setup=write("{tmp}/afile"),
    ),
    Case(
        E,
        "out-is-file",
        ["--model", "tiny", "--out", "{tmp}/afile", "--force"],
        "is not a folder",
        setup=write("{tmp}/afile"),
    ),
    Case(
        E,
        "out-readonly-parent",
        ["--model", "tiny", "--out", "{tmp}/ro/out"],
        "not writable",
        setup=readonly("{tmp}/ro"),
    ),
    Case(E, "out-readonly-fs", ["--model", "tiny", "--out", "/proc/tgate-out"], "not writable"),
    Case(
        E,
        "out-locked",
        ["--model", "tiny", "--out", OUT],
        "another process (pid 4242) is writing",
        setup=hold_lock(OUT),
    ),
    Case(E, "engines-without-tensorrt", ["--model", "tiny", "--out", OUT, "--engines"], TRT_MISSING),
]

# --- tgate-run -------------------------------------------------------------------------------------
R = "run"
PROMPT = "a red circle"


def run(*extra: str | bytes, prompt: str | bytes = PROMPT) -> list[str | bytes]:
    return [EXPORT, prompt, "--steps", "2", "--out", "{tmp}/image.png", *extra]


RUN_CASES = [
    Case(R, "export-missing", ["{tmp}/nope", PROMPT], "does not exist: run tgate-export first"),
    Case(R, "export-not-export", ["{tmp}", PROMPT], "has no manifest.json"),
    Case(R, "manifest-list", run(), "manifest.json holds a list, not an object", setup=edit_manifest(lambda d: [])),
    Case(R, "manifest-not-json", run(), "is not valid JSON", setup=write("{export}/manifest.json", "{not json")),
    Case(R, "manifest-binary", run(), "is not valid JSON", setup=write("{export}/manifest.json", b"\xff\xfe{")),
    Case(
        R, "manifest-old-format", run(), "format_version 1 is not 2", setup=edit_manifest(set_path("format_version", 1))
    ),
    Case(
        R,
        "manifest-no-defaults",
        run(),
        "field defaults: field required",
        setup=edit_manifest(set_path("defaults", DELETE)),
    ),
    Case(
        R,
        "manifest-no-graph",
        run(),
        "the graph 'vae_decoder' is missing",
        setup=edit_manifest(set_path("graphs.vae_decoder", DELETE)),
    ),
    Case(
        R,
        "manifest-cache-too-few",
        run(),
        "manifest.json field cache_layers: 6 attn2",
        setup=edit_manifest(drop_cache_layer),
    ),
    Case(
        R,
        "manifest-cache-too-many",
        run(),
        "manifest.json field cache_layers: 8 attn2",
        setup=edit_manifest(add_cache_layer),
    ),
    Case(
        R,
        "manifest-cache-level-zero",
        run(),
        "field cache_layers.0.level: input should be greater than 0",
        setup=edit_manifest(set_path("cache_layers.0.level", 0)),
    ),
    Case(
        R,
        "manifest-scale-factor-zero",
        run(),
        "field latent.vae_scale_factor: input should be greater than 0",
        setup=edit_manifest(set_path("latent.vae_scale_factor", 0)),
    ),
    Case(
        R, "manifest-multiple-zero", run(), "field latent.multiple", setup=edit_manifest(set_path("latent.multiple", 0))
    ),
    Case(
        R,
        "manifest-scaling-nan",
        run(),
        "field latent.scaling_factor",
        setup=edit_manifest(set_path("latent.scaling_factor", float("nan"))),
    ),
    Case(
        R, "manifest-channels-mismatch", run(), "(latent.channels)", setup=edit_manifest(set_path("latent.channels", 3))
    ),
    Case(
        R,
        "manifest-sample-rank",
        run(),
        "sample has shape [1]",
        setup=edit_manifest(set_path("graphs.unet_pregate.inputs.0.shape", [1])),
    ),
    Case(R, "manifest-max-length", run(), "field text.max_length", setup=edit_manifest(set_path("text.max_length", 2))),
    Case(
        R,
        "manifest-encoder-incomplete",
        run(),
        "field text.encoders.0.tokenizer: field required",
        setup=edit_manifest(set_path("text.encoders", [{"graph": "text_encoder"}])),
    ),
    Case(R, "manifest-dtype-unknown", run(), "field dtype", setup=edit_manifest(set_path("dtype", "fp8"))),
    Case(
        R,
        "manifest-sha-malformed",
        run(),
        "field files.tokenizer/vocab.json",
        setup=edit_manifest(lambda d: d["files"].update({"tokenizer/vocab.json": "abc"})),
    ),
    Case(
        R,
        "manifest-files-emptied",
        run(),
        "scheduler/scheduler_config.json (read by the runtime) is not under",
        setup=edit_manifest(set_path("files", {})),
    ),
    Case(
        R,
        "manifest-tokenizer-elsewhere",
        run(),
        "nope/vocab.json (read by the runtime) is not under sha256",
        setup=edit_manifest(set_path("text.tokenizer", "nope")),
    ),
    Case(
        R,
        "manifest-scheduler-file",
        run(),
        "is not under sha256",
        setup=edit_manifest(set_path("scheduler", "scheduler/scheduler_config.json")),
    ),
    Case(
        R,
        "manifest-graph-unhashed",
        run(),
        "field graphs.unet_pregate.file",
        setup=edit_manifest(set_path("graphs.unet_pregate.files", {})),
    ),
    Case(
        R,
        "manifest-graph-elsewhere",
        run(),
        "field graphs.vae_decoder.file",
        setup=edit_manifest(set_path("graphs.vae_decoder.file", "tokenizer/vocab.json")),
    ),
    Case(
        R,
        "manifest-steps-string",
        run(),
        "field defaults.steps",
        setup=edit_manifest(set_path("defaults.steps", "many")),
    ),
    Case(
        R,
        "manifest-guidance-nan",
        run(),
        "field defaults",
        setup=edit_manifest(set_path("defaults.guidance_scale", float("nan"))),
    ),
    Case(
        R,
        "manifest-dtype",
        run(),
        "field graphs.unet_pregate.inputs.0.dtype",
        setup=edit_manifest(set_path("graphs.unet_pregate.inputs.0.dtype", "float64")),
    ),
    Case(
        R,
        "manifest-absolute-path",
        run(),
        "outside the export folder",
        setup=edit_manifest(set_path("graphs.vae_decoder.file", "/etc/passwd")),
    ),
    Case(
        R,
        "manifest-parent-path",
        run(),
        "outside the export folder",
        setup=edit_manifest(set_path("scheduler", "../scheduler")),
    ),
    Case(R, "manifest-unknown-key", run(), "field surprise", setup=edit_manifest(set_path("surprise", 1))),
    Case(
        R,
        "scheduler-config-edited",
        run(),
        "scheduler_config.json does not match its sha256",
        setup=append("{export}/scheduler/scheduler_config.json", " "),
        before="load",
    ),
    Case(
        R,
        "vocab-edited",
        run(),
        "vocab.json does not match its sha256",
        setup=append("{export}/tokenizer/vocab.json", " "),
        before="load",
    ),
    Case(
        R, "vocab-deleted", run(), "vocab.json is missing", setup=delete("{export}/tokenizer/vocab.json"), before="load"
    ),
    Case(
        R,
        "scheduler-deleted",
        run(),
        "scheduler_config.json is missing",
        setup=delete("{export}/scheduler"),
        before="load",
    ),
    Case(
        R,
        "graph-flipped",
        run(),
        "unet/unet_pregate.onnx does not match its sha256",
        setup=flip_byte("{export}/unet/unet_pregate.onnx"),
        before="load",
    ),
    Case(
        R,
        "graph-deleted",
        run(),
        "unet/unet_postgate.onnx is missing",
        setup=delete("{export}/unet/unet_postgate.onnx"),
        before="load",
    ),
    Case(
        R,
        "unet-config-edited",
        run(),
        "unet/config.json does not match",
        setup=append("{export}/unet/config.json", " "),
        before="load",
    ),
    Case(R, "seed-2**70", run("--seed", str(2**70)), "seed must be an integer in 0..9223372036854775807"),
    Case(R, "seed-negative", run("--seed", "-1"), "seed must be an integer in 0..9223372036854775807, got -1"),
    Case(R, "steps-zero", run("--steps", "0"), "--steps must be an integer in 1..1000, got 0"),
    Case(R, "steps-huge", run("--steps", "1001"), "in 1..1000, got 1001"),
    Case(R, "gate-zero", run("--gate", "0"), "--gate must be an integer >= 1, got 0"),
    Case(R, "gate-negative", run("--gate", "-3"), "--gate must be an integer >= 1, got -3"),
    Case(R, "guidance-1e38", run("--guidance", "1e38"), "--guidance must be a finite number in 0..100"),
    Case(R, "guidance-nan", run("--guidance", "nan"), "--guidance must be a finite number in 0..100, got nan"),
    Case(R, "guidance-inf", run("--guidance", "inf"), "--guidance must be a finite number"),
    Case(R, "guidance-negative", run("--guidance", "-1"), "--guidance must be a finite number in 0..100"),
    Case(R, "height-zero", run("--height", "0"), "height must be an integer >= 1, got 0"),
    Case(R, "width-negative", run("--width", "-8"), "width must be an integer >= 1, got -8"),
    Case(R, "height-not-multiple", run("--height", "60"), "multiples of"),
    Case(R, "size-over-cap", run("--height", "4096", "--width", "4096"), "over this export's cap"),
    Case(R, "size-over-given-cap", run("--max-pixels", "100"), "over this export's cap of 100"),
    Case(R, "max-pixels-zero", run("--max-pixels", "0"), "--max-pixels must be an integer >= 1, got 0"),
    Case(R, "batch-zero", run("--batch", "0"), "batch (number of prompts) must be an integer in 1..64, got 0"),
    Case(R, "batch-huge", run("--batch", "65"), "in 1..64, got 65"),
    Case(R, "threads-negative", run("--threads", "-1"), "--threads must be an integer in 0..1024, got -1"),
    Case(R, "threads-huge", run("--threads", "100000"), "--threads must be an integer in 0..1024, got 100000"),
    Case(R, "sp-interval-zero", run("--sp-interval", "0"), "--sp-interval must be an integer in 1..1000, got 0"),
    Case(R, "warm-up-negative", run("--warm-up", "-1"), "--warm-up must be an integer in 0..1000, got -1"),
    Case(R, "v2-on-v1-export", run("--sp-interval", "5"), "re-export with tgate-export --schedule v2"),
    Case(
        R,
        "latents-is-folder",
        run("--save-latents", "{tmp}/lat"),
        "--save-latents {tmp}/lat is a folder",
        setup=mkdir("{tmp}/lat"),
    ),
    Case(R, "steps-float", run("--steps", "1.5"), "argument --steps: invalid int value"),
    Case(R, "scheduler-unknown", run("--scheduler", "pndm"), "argument --scheduler: invalid choice"),
    Case(R, "engines-with-ort", run("--engines", "openvino"), "--engines names an OpenVINO build"),
    Case(
        R, "openvino-not-built", run("--backend", "openvino"), "has no OpenVINO build named 'openvino'", before="load"
    ),
    Case(
        R,
        "out-is-folder",
        run("--out", "{tmp}/pictures"),
        "is a folder: name a file inside it",
        setup=mkdir("{tmp}/pictures"),
    ),
    Case(R, "out-not-png", run("--out", "{tmp}/image.jpg"), "--out must be a .png path"),
    Case(
        R,
        "out-batch-file-is-folder",
        run("--batch", "2", "--out", "{tmp}/img.png"),
        "img_1.png is a folder",
        setup=mkdir("{tmp}/img_1.png"),
    ),
    Case(R, "out-folder-missing", run("--out", "{tmp}/nope/image.png"), "does not exist: create it first"),
    Case(R, "out-parent-is-file", run("--out", "{tmp}/afile/image.png"), "which is a file", setup=write("{tmp}/afile")),
    Case(R, "out-readonly-folder", run("--out", "{tmp}/ro/image.png"), "not writable", setup=readonly("{tmp}/ro")),
    Case(R, "out-readonly-fs", run("--out", "/proc/image.png"), "not writable"),
    Case(R, "latents-not-npy", run("--save-latents", "{tmp}/latents.txt"), "--save-latents must be a .npy path"),
    Case(R, "prompt-empty", run(prompt=""), "prompt is empty"),
    Case(R, "prompt-blank", run(prompt=" \t "), "prompt is empty"),
    Case(
        R, "prompt-invalid-bytes", run(prompt=b"\xff\xfe\xfd"), "prompt has no tokens the model can read", before="load"
    ),
    Case(
        R,
        "prompt-dropped-chars",
        run(prompt="\u200b\u200b\x01"),
        "prompt has no tokens the model can read",
        before="load",
    ),
]

# --- tgate-quantize --------------------------------------------------------------------------------
Q = "quantize"
QUANTIZE_CASES = [
    Case(Q, "tolerance-nan", [EXPORT, "--out", OUT, "--tolerance", "nan"], "--tolerance must be a finite number"),
    Case(Q, "tolerance-inf", [EXPORT, "--out", OUT, "--tolerance", "inf"], "--tolerance must be a finite number"),
    Case(Q, "tolerance-negative", [EXPORT, "--out", OUT, "--tolerance", "-0.1"], "in 0..1, got -0.1"),
    Case(Q, "out-missing", [EXPORT], "the following arguments are required: --out"),
    Case(
        Q,
        "force-onto-source-parent",
        [EXPORT, "--out", "{tmp}/exports", "--force"],
        "which this command reads",
        setup=mkdir("{tmp}/exports", marker=True),
    ),
    Case(Q, "force-onto-source", [EXPORT, "--out", EXPORT, "--force"], "which this command reads"),
    Case(
        Q,
        "force-symlink-to-source",
        [EXPORT, "--out", "{tmp}/link", "--force"],
        "which this command reads",
        setup=symlink("{tmp}/link", EXPORT),
    ),
    Case(Q, "out-inside-source", [EXPORT, "--out", "{export}/int8"], "which this command reads"),
    Case(Q, "out-not-empty", [EXPORT, "--out", OUT], "pass --force", setup=write(OUT + "/keep.txt")),
    Case(
        Q,
        "force-not-ours",
        [EXPORT, "--out", OUT, "--force"],
        "not an output of tgate-trt",
        setup=write(OUT + "/keep.txt"),
    ),
    Case(Q, "out-parent-is-file", [EXPORT, "--out", "{tmp}/afile/int8"], "which is a file", setup=write("{tmp}/afile")),
    Case(Q, "out-locked", [EXPORT, "--out", OUT], "another process (pid 4242) is writing", setup=hold_lock(OUT)),
    Case(Q, "source-missing", ["{tmp}/nope", "--out", OUT], "does not exist: run tgate-export first"),
    Case(Q, "source-manifest-list", [EXPORT, "--out", OUT], "holds a list", setup=edit_manifest(lambda d: [])),
    Case(
        Q,
        "source-vocab-edited",
        [EXPORT, "--out", OUT],
        "vocab.json does not match its sha256",
        setup=append("{export}/tokenizer/vocab.json", " "),
        before="load",
    ),
    Case(
        Q,
        "source-graph-flipped",
        [EXPORT, "--out", OUT],
        "unet/unet_postgate.onnx does not match",
        setup=flip_byte("{export}/unet/unet_postgate.onnx"),
        before="load",
    ),
    Case(
        Q,
        "source-quantized",
        [EXPORT, "--out", OUT],
        "is already quantized",
        setup=edit_manifest(fake_quantized),
        before="load",
    ),
    Case(
        Q,
        "source-quantized-bare",
        [EXPORT, "--out", OUT],
        "is already quantized",
        setup=edit_manifest(set_path("extra.quantization", {})),
        before="load",
    ),
    Case(
        Q,
        "source-fp16",
        [EXPORT, "--out", OUT],
        "int8 quantization starts from fp32",
        setup=edit_manifest(set_path("dtype", "fp16")),
        before="load",
    ),
]

# --- tgate-build --target openvino -----------------------------------------------------------------
B = "build"


def ov(*extra: str) -> list[str | bytes]:
    return [EXPORT, "--target", "openvino", "--precision", "f32", *extra]


BUILD_CASES = [
    Case(B, "out-outside-export", ov("--out", OUT), "must be a folder directly inside"),
    Case(B, "out-deep-in-export", ov("--out", "{export}/a/b"), "must be a folder directly inside"),
    Case(B, "out-tokenizer", ov("--out", "{export}/tokenizer"), "must name a folder of its own"),
    Case(B, "out-hidden", ov("--out", "{export}/.hidden"), "must name a folder of its own"),
    Case(
        B,
        "out-not-a-build",
        ov("--out", "{export}/mine"),
        "is not an OpenVINO build of this export",
        setup=write("{export}/mine/keep.txt"),
    ),
    Case(B, "out-is-file", ov("--out", "{export}/notes"), "is not a folder", setup=write("{export}/notes")),
    Case(B, "out-locked", ov(), "another process (pid 4242) is writing", setup=hold_lock("{export}/openvino")),
    Case(B, "threads-negative", ov("--threads", "-2"), "--threads must be an integer in 0..1024, got -2"),
    Case(B, "f16-on-cpu", [EXPORT, "--target", "openvino", "--precision", "f16"], "f16 is for Intel GPUs"),
    Case(B, "device-gpu", [EXPORT, "--target", "openvino", "--device", "GPU"], "OpenVINO sees no GPU"),
    Case(B, "precision-unknown", ov("--precision", "int4"), "argument --precision: invalid choice"),
    Case(B, "export-missing", ["{tmp}/nope", "--target", "openvino"], "does not exist: run tgate-export first"),
    Case(
        B,
        "manifest-no-defaults",
        ov(),
        "field defaults: field required",
        setup=edit_manifest(set_path("defaults", DELETE)),
    ),
    Case(B, "quantized-source", ov(), "is an int8 copy for ONNX Runtime", setup=edit_manifest(fake_quantized)),
    Case(B, "fp16-source", ov(), "OpenVINO builds start from fp32", setup=edit_manifest(set_path("dtype", "fp16"))),
    Case(
        B,
        "graph-flipped",
        ov(),
        "vae_decoder/model.onnx does not match its sha256",
        setup=flip_byte("{export}/vae_decoder/model.onnx"),
        before="load",
    ),
    Case(
        B,
        "scheduler-deleted",
        ov(),
        "scheduler_config.json is missing",
        setup=delete("{export}/scheduler"),
        before="load",
    ),
]

# --- tgate-build --target tensorrt (TensorRT is not installed here: everything before it is checked) --
T = "build-trt"
TRT_CASES = [
    Case(T, "tensorrt-missing", [EXPORT], TRT_MISSING),
    Case(T, "batch-zero", [EXPORT, "--batch", "0"], "must be an integer in 1..64, got 0"),
    Case(T, "batch-huge", [EXPORT, "--batch", "1000"], "got 1000"),
    Case(T, "height-zero", [EXPORT, "--height", "0"], "height must be an integer >= 1, got 0"),
    Case(T, "width-not-multiple", [EXPORT, "--width", "100"], "multiples of"),
    Case(T, "size-over-cap", [EXPORT, "--height", "8192", "--width", "8192"], "over this export's cap"),
    Case(T, "opt-level", [EXPORT, "--opt-level", "9"], "optimization level must be an integer 0..5"),
    Case(T, "workspace-nan", [EXPORT, "--workspace-gib", "nan"], "--workspace-gib must be a finite number"),
    Case(T, "workspace-inf", [EXPORT, "--workspace-gib", "inf"], "--workspace-gib must be a finite number"),
    Case(T, "workspace-negative", [EXPORT, "--workspace-gib", "-1"], "in 0..1e+06, got -1.0"),
    Case(T, "workspace-zero", [EXPORT, "--workspace-gib", "0"], "workspace must be a positive number"),
    Case(T, "dynamic-reversed", [EXPORT, "--dynamic", "batch=4:1"], "1 <= MIN <= MAX"),
    Case(T, "dynamic-unknown", [EXPORT, "--dynamic", "steps=1:4"], "dynamic ranges are for"),
    Case(T, "dynamic-malformed", [EXPORT, "--dynamic", "batch"], "--dynamic takes NAME=MIN:MAX"),
    Case(T, "lean-without-compat", [EXPORT, "--exclude-lean-runtime"], "add --version-compatible"),
    Case(T, "export-missing", ["{tmp}/nope"], "does not exist: run tgate-export first"),
    Case(T, "manifest-list", [EXPORT], "holds a list", setup=edit_manifest(lambda d: [])),
    Case(T, "quantized-source", [EXPORT], "is an int8 copy for ONNX Runtime", setup=edit_manifest(fake_quantized)),
    Case(T, "out-is-export", [EXPORT, "--out", EXPORT], "is or contains the export"),
    Case(T, "out-locked", [EXPORT], "another process (pid 4242) is writing", setup=hold_lock("{export}/engines")),
    Case(T, "out-contains-export", [EXPORT, "--out", "{tmp}/exports"], "is or contains the export"),
    Case(T, "out-is-file", [EXPORT, "--out", "{tmp}/afile"], "is not a folder", setup=write("{tmp}/afile")),
    Case(T, "out-readonly-fs", [EXPORT, "--out", "/proc/engines"], "not writable"),
]


# --- Python API ------------------------------------------------------------------------------------
def from_export(**kwargs: Any) -> Callable[..., Any]:
    def call(ctx: Ctx, pipe: Any) -> Any:
        from tgate_trt.runtime.pipeline import TGatePipeline

        return TGatePipeline.from_export(ctx.export, **kwargs)

    return call


def generate(*args: Any, **kwargs: Any) -> Callable[..., Any]:
    def call(ctx: Ctx, pipe: Any) -> Any:
        return pipe(*(args or (PROMPT,)), **{"num_inference_steps": 2, **kwargs})

    call.needs_pipe = True  # type: ignore[attr-defined]
    return call


def export_api(**kwargs: Any) -> Callable[..., Any]:
    def call(ctx: Ctx, pipe: Any) -> Any:
        from tgate_trt.export.exporter import ExportRequest, run_export

        request = {"model": "tiny", "out": "{tmp}/out", **kwargs}
        return run_export(ExportRequest(**{k: ctx.fmt(v) if isinstance(v, str) else v for k, v in request.items()}))

    return call


def quantize_api(out: str = "{tmp}/out", **kwargs: Any) -> Callable[..., Any]:
    def call(ctx: Ctx, pipe: Any) -> Any:
        from tgate_trt.export.quantize import quantize_export

        return quantize_export(ctx.export, ctx.path(out), **kwargs)

    return call


A = "api"


def api(name: str, call: Callable[..., Any], exc: type[BaseException], message: str, **kw: Any) -> Case:
    return Case(A, name, call=call, exc=exc, message=message, needs_pipe=getattr(call, "needs_pipe", False), **kw)


API_CASES = [
    api(
        "missing",
        lambda ctx, pipe: __import__("tgate_trt.runtime.pipeline", fromlist=["x"]).TGatePipeline.from_export(
            ctx.tmp / "nope"
        ),
        ManifestError,
        "does not exist",
    ),
    api("backend", from_export(backend="cuda"), UsageError, "backend must be one of ort, openvino, trt"),
    api("threads", from_export(threads=-1), UsageError, "threads must be an integer in 0..1024"),
    api("threads-huge", from_export(threads=10**6), UsageError, "threads must be an integer in 0..1024"),
    api("max-pixels-zero", from_export(max_pixels=0), UsageError, "max_pixels must be an integer >= 1"),
    api("manifest-list", from_export(), ManifestError, "holds a list", setup=edit_manifest(lambda d: [])),
    api(
        "manifest-no-graph",
        from_export(),
        ManifestError,
        "graph 'unet_pregate' is missing",
        setup=edit_manifest(set_path("graphs.unet_pregate", DELETE)),
    ),
    api(
        "vocab-edited",
        from_export(),
        ManifestError,
        "vocab.json does not match its sha256",
        setup=append("{export}/tokenizer/vocab.json", " "),
        before="load",
    ),
    api(
        "scheduler-deleted",
        from_export(),
        ManifestError,
        "scheduler_config.json is missing",
        setup=delete("{export}/scheduler"),
        before="load",
    ),
    api("export-height-zero", export_api(height=0), UserError, "--height must be positive, got 0"),
    api(
        "export-onto-source",
        export_api(out="{tmp}/m", model="{tmp}/m/sd", force=True),
        OutputError,
        "which this command reads",
        setup=(mkdir("{tmp}/m", marker=True), fake_model("{tmp}/m/sd")),
    ),
    api("quantize-tolerance-nan", quantize_api(tolerance=float("nan")), UsageError, "--tolerance must be a finite"),
    api("quantize-onto-source", quantize_api(out=EXPORT, force=True), OutputError, "which this command reads"),
    api("seed-2**70", generate(seed=2**70), UsageError, "seed must be an integer in 0..9223372036854775807"),
    api("seed-negative", generate(seed=-1), UsageError, "got -1"),
    api("seed-float", generate(seed=1.5), UsageError, "seed must be an integer, got 1.5"),
    api("seed-bool", generate(seed=True), UsageError, "seed must be an integer, got True"),
    api("steps-zero", generate(num_inference_steps=0), UsageError, "num_inference_steps must be an integer in 1..1000"),
    api("gate-zero", generate(gate_step=0), UsageError, "gate_step must be an integer >= 1"),
    api("guidance-nan", generate(guidance_scale=float("nan")), UsageError, "guidance_scale must be a finite number"),
    api("guidance-1e38", generate(guidance_scale=1e38), UsageError, "guidance_scale must be a finite number"),
    api("guidance-string", generate(guidance_scale="7.5"), UsageError, "guidance_scale must be a number"),
    api("height-zero", generate(height=0), UsageError, "height must be an integer >= 1, got 0"),
    api("width-float", generate(width=64.0), UsageError, "width must be an integer, got 64.0"),
    api("size-over-cap", generate(height=4096, width=4096), UsageError, "over this export's cap"),
    api("prompt-empty", generate(""), UsageError, "prompt is empty"),
    api("prompt-empty-list", generate([]), UsageError, "non-empty list of strings"),
    api("prompt-none", generate(None), UsageError, "prompt must be a string"),
    api("prompt-dropped-chars", generate("\u200b\x01"), UsageError, "prompt has no tokens the model can read"),
    api("prompt-surrogates", generate("\udcff\udcfe"), UsageError, "prompt has no tokens the model can read"),
    api("batch-huge", generate(["a cat"] * 65), UsageError, "batch (number of prompts) must be an integer in 1..64"),
    api(
        "negatives-mismatch",
        generate(["a", "b"], negative_prompt=["x", "y", "z"]),
        UsageError,
        "negative_prompt has 3 entries for 2 prompts",
    ),
    api("scheduler", generate(scheduler="pndm"), UsageError, "scheduler must be one of"),
    api("sp-interval-zero", generate(sp_interval=0), UsageError, "sp_interval must be an integer in 1..1000"),
    api("v2-on-v1-export", generate(sp_interval=5), UsageError, "--schedule v2"),
    api("sizes-unknown-key", generate(sizes={"original": (64, 64)}), UsageError, "sizes has unknown key(s) original"),
    api("sizes-not-pair", generate(sizes={"target_size": 64}), UsageError, "must be a pair of integers"),
    api("sizes-negative", generate(sizes={"crops_coords_top_left": (0, -8)}), UsageError, "must be an integer >= 0"),
]

CLI_CASES = EXPORT_CASES + RUN_CASES + QUANTIZE_CASES + BUILD_CASES + TRT_CASES
