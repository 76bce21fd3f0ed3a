"""Two processes through `accelerate launch` on the CPU (gloo): train-vae, train-unet, generate, bench-recon.

One launch runs the four `ldm` commands in turn in the same two processes (the expensive part is
starting them). A small worker wraps the commands to record, per rank, the weights each process holds
at the end of training and the images each micro-step drew. `accelerate launch --cpu` is not used: in
accelerate 1.15 it starts a single process whatever `--num_processes` says; `--multi_gpu` on a machine
without GPUs starts the processes with DistributedType.MULTI_CPU.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evaluation.bench_recon import run_bench_recon
from workflows.cli import main
from ldm_core.config.settings import load_config
from ldm_core.data.step_batches import StepBatches
from stage_a_vae.config import StageAConfig
from stage_a_vae.networks import build_stage_a

ROOT = Path(__file__).resolve().parents[1]
STAGE_A = ["model.preset=kl-f8-tiny", "model.block_out_channels=[4,4,8,8]", "model.norm_num_groups=2",
           "data.resolution=16", "data.shapes_count=24", "data.val_count=4", "loss.lpips_trunk=random",
           "loss.perceptual_weight=0", "loss.disc_start=1", "loss.disc_channels=4", "loss.disc_num_layers=2",
           "train.batch_size=2", "train.log_every=1", "train.validate_every=1000", "train.progress_bar=false",
           "train.latent_stats_images=4", "ema.enabled=false", "train.max_steps=4", "train.lr=1e-3",
           "train.lr_warmup_steps=2", "train.lr_schedule=linear"]
STAGE_B = ["model.preset=unet-tiny", "data.resolution=16", "data.shapes_count=24", "data.val_count=4",
           "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.log_every=1",
           "train.progress_bar=false", "sampling.sample_every=1000", "sampling.grid_images=2",
           "sampling.num_inference_steps=1", "ema.enabled=false", "train.max_steps=3"]
# No --device: on a machine without CUDA the processes must still split the images (cpu_only()).
GENERATE = ["--num-images", "4", "--steps", "2", "--scheduler", "ddim", "--seed", "3", "--batch-size", "1"]
BENCH = ["--data", "builtin:shapes", "--resolution", "16", "--num-images", "6", "--metrics", "psnr,ssim",
         "--batch-size", "1", "--no-progress"]

WORKER = '''
import json, sys
from pathlib import Path
from accelerate import PartialState
from safetensors.torch import save_file
import ldm_core.training.run, ldm_core.data.step_batches, ldm_core.training.accelerator
from workflows.cli import main

out = Path(sys.argv[1])
# As the trainers do: without CUDA, the process group is joined only when asked for the CPU.
rank = PartialState(cpu=True).process_index
draws = []
original_call, original_end = ldm_core.data.step_batches.StepBatches.__call__, ldm_core.training.accelerator.end_run

def record_call(self, micro_step):
    indices, flips = original_call(self, micro_step)
    draws.append([int(micro_step), indices.tolist()])
    return indices, flips

def record_end(accelerator, _stage=[0]):
    # Every process saves the weights it holds when training ends, to compare the ranks.
    _stage[0] += 1
    for i, model in enumerate(accelerator._models):
        state = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.detach().contiguous() for k, v in state.items()},
                  str(out / f"stage{_stage[0]}_model{i}_rank{rank}.safetensors"))
    (out / f"stage{_stage[0]}_draws_rank{rank}.json").write_text(json.dumps(draws))
    draws.clear()
    original_end(accelerator)

ldm_core.data.step_batches.StepBatches.__call__ = record_call
ldm_core.training.run.end_run = record_end
for command in json.loads(Path(sys.argv[2]).read_text()):
    assert main(command) == 0, command
ldm_core.training.accelerator.exit_process(0)  # as the `ldm` executable ends (workflows.cli.run)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(root: Path, worker_source: str, args: list[str]) -> None:
    """Run `worker_source` in two processes with `accelerate launch` and fail with their stderr."""
    (root / "worker.py").write_text(worker_source)
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), str(root / "worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    commands = [
        ["train-vae", "--data", "builtin:shapes", "--out", str(root / "a"), *STAGE_A],
        ["train-unet", "--vae", str(root / "a" / "vae"), "--data", "builtin:shapes", "--out", str(root / "b"),
         *STAGE_B, f"data.latent_cache_dir={root / 'cache'}"],
        ["generate", "--model", str(root / "b" / "pipeline"), "--out", str(root / "gen2"), *GENERATE],
        ["bench-recon", "--vae", str(root / "a"), *BENCH, "--out", str(root / "bench2" / "results.json")],
    ]
    (root / "commands.json").write_text(json.dumps(commands))
    _launch_two(root, WORKER, [str(root), str(root / "commands.json")])
    return root


def _rank_files(root, stage, model):
    return [load_file(str(root / f"stage{stage}_model{model}_rank{r}.safetensors")) for r in (0, 1)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_hold_identical_weights_after_training(two_process_run):
    # Stage A: autoencoder (model 0) and discriminator (model 1); Stage B: the U-Net.
    for stage, model in ((1, 0), (1, 1), (2, 0)):
        r0, r1 = _rank_files(two_process_run, stage, model)
        assert _same(r0, r1), (stage, model)
    info = json.loads((two_process_run / "a" / "run_info.json").read_text())
    assert info["processes"] == 2


def test_discriminator_trains_under_ddp(two_process_run):
    cfg = load_config(StageAConfig, None, STAGE_A)
    initial = build_stage_a(cfg).discriminator.state_dict()  # as the trainer draws it from train.seed
    trained = _rank_files(two_process_run, 1, 1)[0]
    assert not _same(initial, trained)
    rows = json.loads((two_process_run / "a" / "metrics.json").read_text())["history"]
    d_losses = [r["d_loss"] for r in rows if "d_loss" in r]
    assert len(d_losses) == 3 and all(np.isfinite(d_losses))  # steps 1, 2, 3 (disc_start=1)


def test_global_batch_is_split_over_ranks_and_accumulated(two_process_run):
    for stage, cfg_list, count in ((1, STAGE_A, 24 - 4), (2, STAGE_B, 24 - 4)):
        per_rank = [json.loads((two_process_run / f"stage{stage}_draws_rank{r}.json").read_text()) for r in (0, 1)]
        accum = 2 if stage == 2 else 1
        max_steps = 3 if stage == 2 else 4
        assert [m for m, _ in per_rank[0]] == list(range(max_steps * accum))  # micro-steps of every optimizer step
        for (m, a), (_, b) in zip(*per_rank):
            assert len(a) == len(b) == 2 and not set(a) & set(b)
            # Together the two ranks draw what one process with batch 2 x 2 would draw.
            single = StepBatches(np.arange(count), 4, 1, 0, 0, flip=True)(m)[0]
            if stage == 1:  # Stage A indexes the training split; Stage B its positions
                continue
            assert a + b == single.tolist()


def test_learning_rate_is_not_scaled_or_stepped_per_process(two_process_run):
    rows = json.loads((two_process_run / "a" / "metrics.json").read_text())["history"]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # Linear warm-up over 2 steps, then linear decay to 0 at step 4; logged after steps 1..4.
    expected = [1e-3 * min(s / 2, (4 - s) / 2) for s in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected)


def test_generation_matches_one_process(two_process_run, tmp_path):
    assert main(["generate", "--model", str(two_process_run / "b" / "pipeline"), "--out", str(tmp_path), *GENERATE]) == 0
    two = sorted((two_process_run / "gen2").glob("image_*.png"))
    one = sorted(tmp_path.glob("image_*.png"))
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 4
    for a, b in zip(one, two):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


def test_benchmark_matches_one_process(two_process_run):
    two = json.loads((two_process_run / "bench2" / "results.json").read_text())
    one = run_bench_recon([str(two_process_run / "a")], "builtin:shapes", 16, num_images=6, metrics=("psnr", "ssim"),
                          batch_size=1, progress=False, device="cpu")
    assert two["meta"]["world_size"] == 2
    for m1, m2 in zip(one["models"], two["models"]):
        assert m1["name"] == m2["name"]
        for metric in ("psnr", "ssim"):  # per-image values summarised: mean, std and n all equal
            for key in ("mean", "std", "n"):
                assert m1["metrics"][metric][key] == m2["metrics"][metric][key], (m1["name"], metric, key)
        assert m2["metrics"]["psnr"]["n"] == 6


SIGNAL_WORKER = '''
import json, os, signal, sys
from pathlib import Path
from accelerate import PartialState
import ldm_core.data.step_batches
from ldm_core.training.accelerator import exit_process
from workflows.cli import main

out = Path(sys.argv[1])
rank = PartialState(cpu=True).process_index
original = ldm_core.data.step_batches.StepBatches.__call__

def call(self, micro_step):
    if rank == 1 and micro_step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # only this process is told to stop, in the middle of step 2
    return original(self, micro_step)

ldm_core.data.step_batches.StepBatches.__call__ = call
(out / f"rc{rank}").write_text(str(main(json.loads(sys.argv[2]))))
exit_process(0)  # as the `ldm` executable ends (workflows.cli.run)
'''


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    command = ["train-vae", "--data", "builtin:shapes", "--out", str(run), *STAGE_A, "train.max_steps=8"]
    _launch_two(tmp_path, SIGNAL_WORKER, [str(tmp_path), json.dumps(command)])
    assert [(tmp_path / f"rc{r}").read_text() for r in (0, 1)] == ["130", "130"]  # both stopped, none hung
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000003"]
    assert not (run / "vae").exists()  # a stopped run exports nothing
