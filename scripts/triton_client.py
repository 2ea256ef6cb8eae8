"""Send a prompt to a served T-GATE model (HTTP or gRPC) and save the image as a PNG.

    python scripts/triton_client.py "a red circle" --url 127.0.0.1:8000 --out image.png
    python scripts/triton_client.py "a red circle" --protocol grpc --url 127.0.0.1:8001 --seed 3 --steps 25

Needs only tritonclient, numpy and Pillow (no tgate_trt), so it runs on any client machine. Inputs
left out take the model's defaults (its config.pbtxt parameters).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# input name -> (Triton wire type, numpy dtype); must match tgate_trt/triton/contract.py
INPUT_TYPES = {
    "prompt": ("BYTES", np.object_),
    "negative_prompt": ("BYTES", np.object_),
    "seed": ("INT64", np.int64),
    "steps": ("INT32", np.int32),
    "gate_step": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "height": ("INT32", np.int32),
    "width": ("INT32", np.int32),
    "sp_interval": ("INT32", np.int32),  # T-GATE V2 (a model served from a --schedule v2 export)
    "fi_interval": ("INT32", np.int32),
    "warm_up": ("INT32", np.int32),
}


def client_module(protocol: str) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
    return module


def make_inputs(module: Any, prompt: str, **params: Any) -> list[Any]:
    """One ``InferInput`` per given value (None = leave it to the model's default)."""
    inputs = []
    for name, value in {"prompt": prompt, **params}.items():
        if value is None:
            continue
        wire, dtype = INPUT_TYPES[name]
        array = np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=dtype)
        tensor = module.InferInput(name, [1], wire)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def generate(client: Any, module: Any, model: str, prompt: str, **params: Any) -> np.ndarray:
    """The image, ``[H, W, 3]`` uint8; tritonclient's InferenceServerException on a refused request."""
    result = client.infer(model, make_inputs(module, prompt, **params), outputs=[module.InferRequestedOutput("image")])
    return np.asarray(result.as_numpy("image"), dtype=np.uint8)


DEFAULT_OUT = Path("out", "image.png")  # in the current folder, never a tracked file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 for HTTP, :8001 for gRPC)")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"), help="default: http")
    p.add_argument("--model", default="sd15_tgate", help="model name in the repository (default: sd15_tgate)")
    p.add_argument("--negative", default=None, help="negative prompt (default: none)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--gate", type=int, default=None, help="gate step (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument(
        "--sp-interval", type=int, default=None, help="T-GATE V2: self-attention every N steps before the gate"
    )
    p.add_argument("--fi-interval", type=int, default=None, help="T-GATE V2: ... and after it (default: the model's)")
    p.add_argument(
        "--warm-up", type=int, default=None, help="T-GATE V2: steps before attention caching (default: the model's)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG path (default: {DEFAULT_OUT}, folder made)")
    args = p.parse_args(argv)
    module = client_module(args.protocol)
    url = args.url or ("127.0.0.1:8000" if args.protocol == "http" else "127.0.0.1:8001")
    client = module.InferenceServerClient(url)
    start = time.perf_counter()
    try:
        image = generate(
            client,
            module,
            args.model,
            args.prompt,
            negative_prompt=args.negative,
            seed=args.seed,
            steps=args.steps,
            gate_step=args.gate,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            sp_interval=args.sp_interval,
            fi_interval=args.fi_interval,
            warm_up=args.warm_up,
        )
    except Exception as exc:  # tritonclient raises InferenceServerException (and socket errors)
        print(f"triton_client: error: {exc}", file=sys.stderr)
        return 1
    from PIL import Image

    if args.out == DEFAULT_OUT:
        DEFAULT_OUT.parent.mkdir(exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(args.out)
    print(f"{image.shape[1]}x{image.shape[0]} in {time.perf_counter() - start:.2f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
