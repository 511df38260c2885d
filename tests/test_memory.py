"""The per-trial memory estimate: exact parameter counts, an upper bound on what real training
steps use, and a refusal of the issue's channel counts on this machine, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hpsearch.memory import GIB, available_bytes, check_fits, estimate, parameter_count
from hpsearch.model import CNN, ModelSpec, count_parameters

CPU = torch.device("cpu")


@pytest.mark.fast
@pytest.mark.parametrize("spec", [ModelSpec(1, 10, (24, 24), 32, 64, 0.2), ModelSpec(3, 7, (28, 20), 5, 3, 0.0)])
def test_parameter_count_is_the_models(spec: ModelSpec) -> None:
    assert parameter_count(spec) == count_parameters(CNN(spec))


@pytest.mark.fast
@pytest.mark.parametrize("channels", [10**5, 10**11])
def test_the_issues_channel_counts_are_refused_before_allocating(channels: int) -> None:
    spec = ModelSpec(1, 10, (24, 24), channels, 64, 0.2)
    reason = check_fits(spec, 128, 2048, "adamw", 0.0, CPU)
    assert reason is not None and reason.startswith("does not fit in memory: needs about")
    assert f"{parameter_count(spec):,} parameters" in reason and "available on cpu" in reason
    assert "conv1_channels, conv2_channels or batch_size" in reason  # what to change


@pytest.mark.fast
def test_the_seed_network_fits_and_the_estimate_grows_with_what_it_counts() -> None:
    assert available_bytes(CPU) is not None and available_bytes(CPU) > 0
    spec = ModelSpec(1, 10, (24, 24), 32, 64, 0.2)
    assert check_fits(spec, 256, 2048, "adamw", 0.0, CPU) is None
    small = estimate(spec, 64, 64, "sgd", 0.0, CPU)
    assert estimate(spec, 64, 64, "sgd", 0.9, CPU).weights > small.weights  # momentum buffers
    assert estimate(spec, 64, 64, "adam", 0.0, CPU).weights > estimate(spec, 64, 64, "sgd", 0.9, CPU).weights
    assert estimate(spec, 512, 64, "sgd", 0.0, CPU).activations == 8 * small.activations
    assert estimate(spec, 64, 4096, "sgd", 0.0, CPU).activations == 32 * small.activations  # evaluation


PROBE = """
import gc, json, sys, threading, time, torch
import torch.nn.functional as F
from hpsearch.memory import estimate
from hpsearch.model import CNN, ModelSpec
from hpsearch.train import HParams, build_optimizer

torch.set_num_threads(1)

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

out = []
# The first step in a process sets up the kernel libraries (~170 MB here, once per worker, not
# per trial): the tiny first config pays for it and is left out of the comparison.
for c1, c2, batch, opt in [[2, 2, 128, "adamw"]] + json.loads(sys.argv[1]):
    spec = ModelSpec(1, 10, (24, 24), c1, c2, 0.2)
    hp = HParams(1e-3, 0.0, opt, 0.9, c1, c2, 0.2, batch)
    x, y = torch.randn(batch, 1, 24, 24).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (batch,))
    gc.collect()
    base, peak, done = rss(), [0], [False]
    def watch():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)
    t = threading.Thread(target=watch)
    t.start()
    model = CNN(spec).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(hp, model.parameters())
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    done[0] = True
    t.join()
    need = estimate(spec, batch, batch, opt, 0.9, torch.device("cpu")).total
    out.append([c1, c2, batch, opt, peak[0] - base, need])
    del model, optimizer, loss, x, y
print(json.dumps(out))
"""


def test_the_estimate_bounds_what_real_training_steps_use() -> None:
    """Measured in a fresh process: the resident memory a few training steps add, against the
    estimate for them. An upper bound, and not a wild one (measured: 1.4-1.7x)."""
    configs = [[128, 512, 128, "adamw"], [512, 32, 128, "sgd"]]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(configs)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for c1, c2, batch, opt, used, need in json.loads(r.stdout)[1:]:
        assert used > 100 * 2**20, (c1, c2, batch, used)  # the probe measured something real
        assert used <= need <= 3 * used, f"{c1}/{c2} batch {batch} {opt}: used {used / GIB:.2f} GiB, estimate {need / GIB:.2f} GiB"
