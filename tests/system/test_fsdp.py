"""FSDP under ``torchrun --nproc_per_node 2`` (gloo, CPU): each rank records its own shard, with no
gather, and the run reads back and analyzes as if one process had recorded it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trajscope
from trajscope import runformat as fmt
from trajscope.store import open_run
from trajscope.tools.validate import validate_run as validate

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo")]

STEPS = 5
GLOBAL = 32  # the global batch; each rank takes half

# The documented lines are the Recorder's: nothing else in the loop is there for trajscope. The
# gathers (full_tensor, summon_full_params) only produce the test's expected values.
WORKER = textwrap.dedent(f'''
    import os, sys, torch, torch.distributed as dist
    from safetensors.torch import save_file
    from support.recorder_objectives import batches, dataset, mlp, xent
    from trajscope.recorders import Recorder

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run, mode = sys.argv[1], sys.argv[2]
    kill_at = int(os.environ.get("KILL_AT", "-1"))
    model = mlp()
    if mode in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = None  # hsdp: two replicas, each sharded over world // 2 ranks
        if mode == "hsdp":
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)

    def gathered(grads):
        if mode != "fsdp1":
            out = {{"param/" + n: p.full_tensor().clone() for n, p in model.named_parameters()}}
            if grads:
                out.update({{"grad/" + n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}})
            return out
        with FSDP.summon_full_params(model, with_grads=grads):
            named = [(n.replace("_fsdp_wrapped_module.", ""), p) for n, p in model.named_parameters()]
            out = {{"param/" + n: p.detach().clone() for n, p in named}}
            if grads:
                out.update({{"grad/" + n: p.grad.detach().clone() for n, p in named}})
            return out

    os.makedirs(run + ".expected", exist_ok=True)
    x, y = dataset()
    half = {GLOBAL} // world
    with Recorder(run, model, opt, objective="support.recorder_objectives:make_mlp") as rec:
        for step, idx in enumerate(batches({STEPS}, size={GLOBAL})):
            mine = idx[rank * half:(rank + 1) * half]
            batch = (x[mine], y[mine])
            opt.zero_grad()
            loss = xent(model, batch)
            loss.backward()
            if mode != "fsdp1":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            else:
                model.clip_grad_norm_(0.1)  # FSDP1's own
            rec.batch(batch, loss=loss)
            expected = gathered(grads=True)
            if rank == 0:
                save_file(expected, f"{{run}}.expected/{{step}}.safetensors")
            if step == kill_at and rank == 1:
                rec.flush()  # its parts of the steps before are on disk; this step's never will be
                os.kill(os.getpid(), 9)
            opt.step()
    expected = gathered(grads=False)
    if rank == 0:
        save_file(expected, f"{{run}}.expected/{{{STEPS}}}.safetensors")
    dist.destroy_process_group()
    # Skip the interpreter's teardown: under load, gloo's threads can abort a process there after
    # its work is done (SIGABRT, "terminate called without an active exception"), with or without
    # a recorder; the run was closed above.
    sys.stdout.flush()
    os._exit(0)
''')


# Layouts that are refused at start(), one after another in one process group: every rank raises the
# same one-line RecorderError, and nothing is left behind.
REFUSALS = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from support.recorder_objectives import mlp
    from trajscope.errors import RecorderError
    from trajscope.recorders import Recorder

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run = sys.argv[1]

    said = open(f"{run}.rank{rank}.txt", "w")  # a file per rank: the ranks' stdout lines may interleave

    def attempt(what, model, **kw):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            Recorder(run + "-" + what, model, opt, **kw).start()
        except RecorderError as exc:
            said.write(f"REFUSED {what} rank {rank}: {exc}\\n")
        else:
            said.write(f"RECORDED {what} rank {rank}\\n")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2,))
    attempt("tp", parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()}))
    stage = torch.nn.Sequential(*list(mlp())[:2]) if rank == 0 else torch.nn.Sequential(*list(mlp())[2:])
    attempt("pp", stage)
    from torch.distributed.fsdp import fully_shard
    attempt("hdf5", fully_shard(mlp()), format="hdf5")
    said.close()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: see WORKER
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(tmp_path: Path, mode: str, script: str = WORKER, nproc: int = 2, **env: str
              ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    run = tmp_path / mode
    (tmp_path / "worker.py").write_text(script)
    tests = Path(__file__).parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(run), mode],
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(tests), *sys.path]), **env},
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return run, proc


def _assert_snapshots_are_the_gathered_tensors(run_dir: Path, steps: list[int]) -> None:
    run = open_run(run_dir)
    for t in steps:
        snap = run.snapshot(t)
        want = load_file(str(run_dir) + f".expected/{t}.safetensors")
        got = {fmt.PARAM + n: v for n, v in snap.params.items()}
        got.update({fmt.GRAD + n: v for n, v in snap.grads.items()})
        assert got.keys() == want.keys(), t
        for k, v in want.items():
            assert torch.equal(got[k], v), (t, k)


@pytest.mark.parametrize(("mode", "nproc"), [("fsdp2", 2), ("fsdp1", 2), ("hsdp", 4)])
def test_fsdp_run_records_each_ranks_shard_and_analyzes_with_no_flags(tmp_path: Path, mode: str, nproc: int) -> None:
    """FSDP2 (per-layer fully_shard and the root, AdamW, clip_grad_norm_), FSDP1 (use_orig_params,
    its own clip_grad_norm_), and HSDP on a 2 x 2 mesh, where only the first replica's ranks (0, 1) write."""
    run_dir, proc = _torchrun(tmp_path, mode, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = open_run(run_dir)
    dist = run.manifest["distributed"]
    assert run.manifest["format_version"] == fmt.SHARDED_FORMAT_VERSION
    kind = "fsdp1" if mode == "fsdp1" else "fsdp2"
    assert (dist["sharding"], dist["shard_ranks"], dist["world_size"]) == (kind, [0, 1], nproc)
    assert run.steps == list(range(STEPS + 1)) and run.final_step == STEPS
    # rank 1 wrote its parts, and only its parts: no step file of its own, a part per snapshot
    parts = sorted(p.name for p in (run_dir / fmt.SHARDS_DIR).iterdir())
    assert parts == [fmt.shard_filename(t, 1) for t in range(STEPS + 1)]
    _assert_snapshots_are_the_gathered_tensors(run_dir, list(range(STEPS + 1)))
    snap = run.snapshot(0)
    assert snap.micro_weights == [1 / nproc] * nproc and len(snap.batch) == nproc  # the global batch
    # clipped at 0.1 on every step: the factor of the whole gradient's norm
    assert all(run.snapshot(t).clip_factor is not None for t in range(STEPS))
    report = validate(run_dir)
    assert not report.problems and not report.warnings, report

    ds = trajscope.analyze(run_dir, progress=False, write=False)
    assert [int(t) for t in ds.step.values] == list(range(STEPS))
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-4


def test_a_rank_killed_mid_step_leaves_the_steps_before_it_whole(tmp_path: Path) -> None:
    kill_at = 3
    run_dir, proc = _torchrun(tmp_path, "fsdp2", KILL_AT=str(kill_at))
    assert proc.returncode != 0
    run = open_run(run_dir)
    assert run.steps == list(range(kill_at)) and run.status != fmt.STATUS_COMPLETE
    _assert_snapshots_are_the_gathered_tensors(run_dir, run.steps)
    report = validate(run_dir)
    assert not report.problems, report.problems
    ds = trajscope.analyze(run_dir, progress=False, write=False)
    assert [int(t) for t in ds.step.values] == list(range(kill_at - 1))
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-4


def test_tensor_and_pipeline_parallelism_and_hdf5_are_refused_at_start(tmp_path: Path) -> None:
    run, proc = _torchrun(tmp_path, "refused", REFUSALS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for r in (0, 1) for line in Path(f"{run}.rank{r}.txt").read_text().splitlines()]
    said = {line.split(":")[0]: line for line in lines}
    assert len(said) == len(lines) == 6 and all(key.startswith("REFUSED") for key in said), lines
    for rank in (0, 1):
        assert "tensor parallelism is not supported" in said[f"REFUSED tp rank {rank}"]
        assert "pipeline parallelism" in said[f"REFUSED pp rank {rank}"] and f"ranks [{1 - rank}]" in said[
            f"REFUSED pp rank {rank}"]
        assert "safetensors storage" in said[f"REFUSED hdf5 rank {rank}"]
    assert not any(tmp_path.glob("refused-*/steps"))  # refused before anything was written
