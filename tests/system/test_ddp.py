"""DDP: two gloo processes on CPU record one run, identical to a single process that consumes the
same global batch as two accumulated micro-batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import trajscope
from support.recorder_objectives import (
    batches,
    dataset,
    make_mlp,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    xent,
)
from trajscope.recorders import Recorder
from trajscope.store import open_run, read_raw

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = 4
GLOBAL = 32  # global batch; each of the 2 ranks takes one half

WORKER = textwrap.dedent(f'''
    import os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from support.recorder_objectives import batches, dataset, mlp, xent
    from trajscope.recorders import Recorder

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=rank, world_size=world)
    dropout = float(os.environ.get("DROPOUT", "0"))
    model = DDP(mlp(dropout=dropout))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset()
    half = {GLOBAL} // world
    if dropout:
        torch.manual_seed(100 + rank)  # each rank draws its own dropout masks (and minibatches)
    objective = "support.recorder_objectives:" + ("make_mlp_dropout" if dropout else "make_mlp")
    with Recorder(sys.argv[1], model, opt, objective=objective) as rec:
        for idx in batches({STEPS}, size={GLOBAL}):
            mine = idx[rank * half:(rank + 1) * half]
            batch = (x[mine], y[mine])
            opt.zero_grad()
            loss = xent(model, batch)
            loss.backward()
            rec.batch(batch, loss=loss)
            opt.step()
    final = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    torch.save(final, sys.argv[1] + f".rank{{rank}}.pt")
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _single_process(run_dir: Path, *, split: bool) -> torch.nn.Module:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset()
    with Recorder(run_dir, model, opt, accumulation=2 if split else 1) as rec:
        for idx in batches(STEPS, size=GLOBAL):
            opt.zero_grad()
            parts = [idx[: GLOBAL // 2], idx[GLOBAL // 2 :]] if split else [idx]
            for part in parts:
                batch = (x[part], y[part])
                loss = xent(model, batch)
                (loss / len(parts)).backward()
                rec.batch(batch, loss=loss)
            opt.step()
    return model


def _two_ranks(tmp_path: Path, run_dir: Path, **env_extra: str) -> list[subprocess.Popen[str]]:
    """Start the two gloo ranks of WORKER recording into ``run_dir``."""
    tests = Path(__file__).parents[1]  # the helpers: support.recorder_objectives
    (tmp_path / "worker.py").write_text(WORKER)
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "INIT": init,
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(tests), *sys.path]), **env_extra}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(run_dir)],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow
def test_dropout_on_every_rank_replays_from_its_own_rng_state(tmp_path: Path) -> None:
    procs = _two_ranks(tmp_path, tmp_path / "ddp", DROPOUT="0.3")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    snap = open_run(tmp_path / "ddp").snapshot(0)
    assert sorted(snap.micro_rng) == [1] and not torch.equal(snap.micro_rng[1]["cpu"], snap.rng["cpu"])
    ds = trajscope.analyze(tmp_path / "ddp", progress=False, points=3, margin=0.0)
    assert float(ds.loss_replay_error.max()) < 1e-6
    assert float(ds.grad_replay_error.max()) < 1e-6


@pytest.mark.slow
def test_two_gloo_ranks_record_one_run_identical_to_a_single_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    procs = _two_ranks(tmp_path, run_dir)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)

    # exactly one run, written by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ddp", "ddp.rank0.pt", "ddp.rank1.pt", "worker.py"]
    lines = [json.loads(s) for s in (run_dir / "scalars.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(STEPS))
    ddp = open_run(run_dir)
    assert ddp.manifest["distributed"] == {"world_size": 2, "writer_rank": 0}

    # the single process consuming the same global batch as two micro-batches (mean): identical
    ref = _single_process(tmp_path / "ref", split=True)
    single = open_run(tmp_path / "ref")
    assert ddp.steps == single.steps == list(range(STEPS + 1))
    for s in ddp.steps:
        meta_d, tens_d = read_raw(ddp.step_path(s))
        meta_s, tens_s = read_raw(single.step_path(s))
        assert meta_d == meta_s, s
        assert tens_d.keys() == tens_s.keys()  # rank 1's RNG state travels as micro-batch 1's
        for k in tens_d:
            assert torch.equal(tens_d[k], tens_s[k]), (s, k)
    snap = ddp.snapshot(1)
    assert snap.micro_weights == [0.5, 0.5] and len(snap.batch) == 2
    final = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"ddp.rank{r}.pt"), final)

    # ... and close to the plain single batch of 32 (same maths, different rounding)
    plain = _single_process(tmp_path / "plain", split=False)
    for a, b in zip(plain.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    ds = trajscope.analyze(run_dir, make_mlp, progress=False, points=3, margin=0.0)
    assert float(ds.loss_replay_error.max()) < 1e-6
    assert float(ds.grad_replay_error.max()) < 1e-6
