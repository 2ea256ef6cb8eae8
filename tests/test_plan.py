"""The T-GATE step plan against the worked V2 table and against the authors' ``tgate_scheduler``."""

from __future__ import annotations

import itertools

import pytest

from tgate_trt.methods.plan import FULL, KINDS, MEAN, TGateParams, counts, plan


def test_worked_v2_table() -> None:
    """SD, 25 steps, gate 10, sp 5, fi 1, warm-up 2 (the authors' defaults), as checked on their package."""
    steps = plan(25, TGateParams.v2())
    assert [s.variant for s in steps] == (
        ["cfg"] * 2 + ["cfg+c1f"] + ["cfg-r1"] * 2 + ["cfg+c1f"] + ["cfg-r1"] * 3 + ["cfg+c2m"] + ["post-r2"] * 15
    )
    assert [s.cfg for s in steps] == [True] * 10 + [False] * 15
    # the gate step also averages attn1 (the package does), but with fi = 1 nothing replays it: not captured
    assert steps[9].capture == (("attn2", MEAN),)


@pytest.mark.parametrize("gate", [1, 3, 10, 25, 40])
def test_v1_is_two_graphs(gate: int) -> None:
    steps = plan(25, TGateParams.v1(gate))
    # gate >= steps is plain CFG: the last step's capture would have no reader, so it is not made
    expect = ["cfg"] * (gate - 1) + ["cfg+c2m"] + ["post-r2"] * (25 - gate) if gate < 25 else ["cfg"] * 25
    assert [s.variant for s in steps] == expect
    assert counts(steps) == {k: expect.count(k) for k in set(expect)}


def test_fi_interval_replays_attn1_after_the_gate() -> None:
    steps = plan(16, TGateParams(gate_step=6, sp_interval=1, fi_interval=3, warm_up=0))
    after = [s.variant for s in steps[5:]]
    # c = 5 averages both kinds, but c = 6 (6 % 3 == 0) recomputes attn1, so only attn2's mean is kept; c = 6
    # captures attn1 for 7-8, c = 9 for 10-11, c = 12 for 13-14; c = 15 is last, its capture has no reader
    cycle = ["post-r2+c1f", "post-r12", "post-r12"]
    assert after == ["cfg+c2m", *cycle * 3, "post-r2"]


BAD = [("sp_interval", 0), ("fi_interval", 0), ("gate_step", 0), ("warm_up", -1)]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_parameters_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        TGateParams(**{"gate_step": 10, field: value})


def _oracle(steps: int, p: TGateParams, cfg: bool, order: int, n: int, clamp: bool) -> list[dict[str, object]]:
    """The authors' loop (``SD.py``/``SDXL.py``) with their ``tgate_scheduler`` and their attention's cache rule
    (``tgate_utils.py``): replay when asked and a cache exists; a capture stores the output (the CFG mean when
    ``keep_shape`` is False); any other computation clears the cache."""
    tgate_utils = pytest.importorskip("tgate.tgate_utils", reason="the authors' tgate package (dev extra)")
    nws = n - steps * order
    nws = max(nws, 0) if clamp else nws
    ca, sa, keep = {"cache": False, "reuse": False}, {"cache": False, "reuse": False}, True
    cache: dict[str, tuple[int, str] | None] = {k: None for k in KINDS}
    out = []
    for i in range(n):
        if i == n - 1 or ((i + 1) > nws and (i + 1) % order == 0):
            ca, sa, keep = tgate_utils.tgate_scheduler(
                cur_step=i - nws,
                gate_step=p.gate_step,
                sp_interval=p.sp_interval,
                fi_interval=p.fi_interval,
                warm_up=p.warm_up,
            )
        on = cfg and (i - nws) < p.gate_step
        row: dict[str, object] = {"cfg": on}
        for kind, flags in (("attn1", sa), ("attn2", ca)):
            if flags["reuse"] and cache[kind] is not None:
                row[kind] = ("replay", cache[kind])
            else:
                cache[kind] = (i, MEAN if (on and not keep) else FULL) if flags["cache"] else None
                row[kind] = ("compute", None)
        out.append(row)
    return out


SWEEP = list(itertools.product([1, 2, 5, 9, 12], [1, 2, 3, 5], [1, 2, 3], [0, 1, 2, 4]))


@pytest.mark.parametrize(("gate", "sp", "fi", "warm"), SWEEP)
def test_matches_the_authors_scheduler(gate: int, sp: int, fi: int, warm: int) -> None:
    params = TGateParams(gate, sp, fi, warm)
    cases = [(True, 1, 0, False), (False, 1, 0, False), (True, 2, -1, False), (True, 2, -1, True)]
    for cfg, order, extra, clamp in cases:
        steps = 10
        n = steps * order + extra  # second order: Heun's 2 * steps - 1 calls
        got = plan(steps, params, cfg=cfg, scheduler_order=order, num_timesteps=n, clamp_warmup=clamp)
        want = _oracle(steps, params, cfg, order, n, clamp)
        assert len(got) == len(want) == n
        for step, row in zip(got, want, strict=True):
            assert step.cfg == row["cfg"], (step, row)
            for kind in KINDS:
                action, source = row[kind]  # type: ignore[misc]
                assert (kind in step.replay) == (action == "replay"), (kind, step, row)
                if action == "replay":  # the capture it reads is in the plan, with the same layout
                    src_index, layout = source
                    assert (kind, layout) in got[src_index].capture, (kind, step, got[src_index])
