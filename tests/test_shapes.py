"""The trained ``shapes`` model: data, judge, tokenizer, training, shipped weights and what it draws."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tgate_trt.zoo.shapes import WEIGHTS, WEIGHTS_RECORD, ShapesWeightsError, data, load, verify
from tgate_trt.zoo.shapes.judge import accuracy, judge
from tgate_trt.zoo.shapes.tokenizer import word_tokenizer


def test_judge_scores_the_generators_own_images() -> None:
    rng = np.random.default_rng(7)
    specs = [data.sample_spec(rng) for _ in range(600)]
    acc = accuracy([data.render(s) for s in specs], specs)
    assert min(acc.values()) >= 0.98, acc


def test_judge_sees_nothing_on_a_blank_image() -> None:
    blank = np.full((64, 64, 3), data.BACKGROUND, np.uint8)
    verdict = judge(blank)
    assert (verdict.color, verdict.shape, verdict.position) == (None, None, None)
    with pytest.raises(ValueError, match="HxWx3"):
        judge(blank[..., 0])


def test_data_is_a_function_of_the_seed() -> None:
    a, caps_a, _ = data.batch(3, 8, empty_fraction=0.5)
    b, caps_b, _ = data.batch(3, 8, empty_fraction=0.5)
    assert np.array_equal(a, b) and caps_a == caps_b
    assert a.shape == (8, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert "" in caps_a  # some captions dropped for classifier-free guidance
    prompts = data.prompt_set()
    assert len(prompts) >= 96 and len({p for p, _, _ in prompts}) == 75


def test_every_caption_word_is_one_token(tmp_path: Path) -> None:
    tok = word_tokenizer(tmp_path, data.vocabulary())
    for word in data.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    ids = tok("a red circle on the left").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in ["a", "red", "circle", "on", "the", "left"]]


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return out


def test_training_runs_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    from tgate_trt.contract.errors import OutputError
    from tgate_trt.zoo.shapes.train import Interrupted, tiny_config, train

    cfg = tiny_config()
    straight = train(tmp_path / "a", tmp_path / "work_a", cfg)
    cfg.stop_after = 4  # stops inside the text encoder stage
    with pytest.raises(Interrupted, match="text step 1/3"):
        train(tmp_path / "b", tmp_path / "work_b", cfg)
    assert not (tmp_path / "b").exists()  # nothing half-written
    cfg.stop_after = None
    resumed = train(tmp_path / "b", tmp_path / "work_b", cfg)
    with pytest.raises(OutputError, match="pass --force"):  # an earlier output is replaced only with force
        train(tmp_path / "b", tmp_path / "work_b", cfg)
    (tmp_path / "work_b" / ".unet.tmp-killed.pt").write_bytes(b"half")  # a killed run's checkpoint write
    resumed = train(tmp_path / "b", tmp_path / "work_b", cfg, force=True)  # every stage done: re-assembled
    assert not (tmp_path / "work_b" / ".unet.tmp-killed.pt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock, no stage left
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(np.array_equal(a[k], b[k]) for k in a)
    record = verify(resumed)
    assert set(record["train_seconds"]) == {"vae", "text_encoder", "unet"}
    pipe = load(resumed)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_shipped_weights_load_offline_and_match_their_hashes(tmp_path: Path) -> None:
    from tgate_trt.families import resolve_model

    record = verify()
    assert record["command"].startswith("python scripts/train_shapes.py")
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size < 20e6
    src = resolve_model("shapes")
    assert src.source["preset"] == "shapes" and src.source["weights_sha256"] == record["files"]
    assert src.pipe.unet.dtype.is_floating_point and src.pipe.vae.config.sample_size == 64

    copy = shutil.copytree(WEIGHTS, tmp_path / "weights")
    unet = next(copy.glob("unet/*.safetensors"))
    unet.write_bytes(unet.read_bytes()[:-1] + b"\0")
    with pytest.raises(ShapesWeightsError, match="was modified"):
        verify(copy)
    (copy / WEIGHTS_RECORD).unlink()
    with pytest.raises(ShapesWeightsError, match="missing"):
        load(copy)


def test_shapes_draws_what_it_is_asked(shapes_export: Path, check_prompts: Callable[[], list[data.Spec]]) -> None:
    """Judged on the ORT pipeline with and without the gate: the model draws the prompt, and gating at
    step 10 of 25 keeps it."""
    from tgate_trt.runtime.pipeline import TGatePipeline

    pipe = TGatePipeline.from_export(shapes_export)
    specs = check_prompts()
    for gate in (25, 10):
        result = pipe([s.caption for s in specs], num_inference_steps=25, gate_step=gate, seed=0)
        acc = accuracy([np.asarray(im) for im in result.images], specs)
        assert acc["color"] == 1.0 and acc["position"] == 1.0 and acc["shape"] >= 5 / 6, (gate, acc)


def test_int8_copy_still_draws_what_it_is_asked(
    shapes_export: Path, tmp_path: Path, check_prompts: Callable[[], list[data.Spec]]
) -> None:
    """tgate-quantize's int8 MatMuls keep the picture: same judge, same prompts, gate 10 of 25."""
    from tgate_trt.export.quantize import quantize_export
    from tgate_trt.runtime.pipeline import TGatePipeline

    quantize_export(shapes_export, tmp_path / "int8")
    specs = check_prompts()
    result = TGatePipeline.from_export(tmp_path / "int8")([s.caption for s in specs], gate_step=10, seed=0)
    acc = accuracy([np.asarray(im) for im in result.images], specs)
    assert acc["color"] == 1.0 and acc["position"] == 1.0 and acc["shape"] >= 5 / 6, acc


def test_eval_writes_table_json_and_grid(shapes_export: Path, tmp_path: Path) -> None:
    import json

    from tgate_trt.tools.evaluate import main as eval_main

    out = tmp_path / "eval"
    assert (
        eval_main(
            [
                "--export",
                str(shapes_export),
                "--gates",
                "3",
                "--steps",
                "6",
                "--seeds-per-prompt",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "eval.json").read_text())
    assert [r["gate"] for r in report["rows"]] == [6, 3] and report["prompts"] == 75
    base, gated = report["rows"]
    assert base["mad_vs_baseline"] == 0.0 and gated["mad_vs_baseline"] > 0.0
    assert all(0.0 <= r[k] <= 1.0 for r in report["rows"] for k in ("color", "shape", "position", "all"))
    assert (out / "grid.png").stat().st_size > 10_000 and "| gate 3 |" in (out / "eval.md").read_text()


def test_eval_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tgate_trt.tools.evaluate import main as eval_main

    assert eval_main(["--gates", "0", "--out", str(tmp_path)]) == 2
    assert "--gates must be an integer in 1..24" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert eval_main(["--export", str(tmp_path / "folder"), "--out", str(tmp_path / "o")]) == 2
    assert "not an export folder" in capsys.readouterr().err
    assert eval_main(["--export", str(tmp_path / "folder"), "--out", str(tmp_path / "folder" / "o")]) == 2
    assert "which this command reads" in capsys.readouterr().err  # never written into its source
    assert eval_main(["--seeds-per-prompt", "0", "--out", str(tmp_path / "o")]) == 2  # was a report of NaNs
    assert "--seeds-per-prompt must be an integer in 1..100" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_replaces_its_report_only_with_force(shapes_export: Path, tmp_path: Path) -> None:
    from tgate_trt.tools.evaluate import main as eval_main

    out = tmp_path / "quality"
    (out / "guidance-7.5").mkdir(parents=True)  # another sitting kept in the same folder
    (out / "eval.json").write_text('{"rows": []}')
    argv = ["--export", str(shapes_export), "--gates", "2", "--steps", "3", "--seeds-per-prompt", "1"]
    assert eval_main([*argv, "--out", str(out)]) == 2  # an earlier report: not without --force
    assert (out / "eval.json").read_text() == '{"rows": []}'
    assert eval_main([*argv, "--out", str(out), "--force"]) == 0
    assert [r["gate"] for r in json.loads((out / "eval.json").read_text())["rows"]] == [3, 2]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "grid.png", "guidance-7.5"]


def test_training_refuses_the_shipped_weights(tmp_path: Path) -> None:
    """Training never replaces the package's weights by accident, nor an output that isn't a model."""
    from tgate_trt.contract.errors import OutputError
    from tgate_trt.zoo.shapes.train import main as train_main
    from tgate_trt.zoo.shapes.train import tiny_config, train

    before = {p: p.stat().st_mtime_ns for p in WEIGHTS.rglob("*")}
    with pytest.raises(OutputError, match="--overwrite-shipped"):
        train(WEIGHTS, tmp_path / "work", tiny_config())
    assert train_main(["--out", str(WEIGHTS), "--work", str(tmp_path / "work")]) == 2
    assert train_main(["--work", str(tmp_path / "work")]) == 2  # no --out: say which to pass
    assert {p: p.stat().st_mtime_ns for p in WEIGHTS.rglob("*")} == before
    assert not (tmp_path / "work").exists()  # refused before a checkpoint was written
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a model")
    with pytest.raises(OutputError, match="not an output of tgate-trt"):
        train(tmp_path / "mine", tmp_path / "work", tiny_config(), force=True)
