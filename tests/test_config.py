"""Study files: every shipped one loads; every kind of bad file gets its one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_cli
from pydantic import ValidationError

from hpsearch.config import STUDIES_DIR, StudyConfig, load_config, shipped_studies
from hpsearch.errors import ConfigError

GOOD = """\
[study]
name = "t"
[data]
dataset = "idx"
[search]
lr = { low = 1e-3, high = 1e-2, log = true }
optimizer = { choices = ["adam", "sgd"] }
[training]
max_epochs = 3
[budget]
n_trials = 4
"""


@pytest.mark.parametrize("name", shipped_studies())
def test_shipped_study_loads(name: str) -> None:
    cfg = load_config(name)
    assert cfg.study.name
    assert cfg.budget.n_trials > 0
    # Loading by path gives the same study.
    assert load_config(str(STUDIES_DIR / f"{name}.toml")).fingerprint() == cfg.fingerprint()


def test_there_is_a_default_cnn_study() -> None:
    assert "cnn" in shipped_studies()
    cfg = load_config("cnn")
    # The default study runs offline, on the MNIST test set shipped in the repository.
    assert cfg.data.dataset == "idx"
    assert (REPO / cfg.data.root / "t10k-images-idx3-ubyte.gz").is_file()
    assert cfg.data.split == (0.70, 0.15, 0.15)


@pytest.mark.parametrize("name,dataset", [("fashion-mnist", "fashion-mnist"), ("kmnist", "kmnist"),
                                          ("cifar10", "cifar10"), ("folder", "folder")])
def test_each_dataset_kind_has_its_study(name: str, dataset: str) -> None:
    assert load_config(name).data.dataset == dataset


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert cfg.sampler.type == "tpe" and cfg.pruner.type == "median"
    assert cfg.search.conv1_channels == 32  # fixed at the seed's value unless searched


BAD = [
    # (what is wrong, the edit to GOOD, a field the message must name, words it must contain)
    ("missing field", ("max_epochs = 3\n", ""), "training.max_epochs", "missing"),
    ("wrong type", ("max_epochs = 3", 'max_epochs = "three"'), "training.max_epochs", "integer"),
    ("low > high", ("low = 1e-3, high = 1e-2", "low = 1e-2, high = 1e-3"), "search.lr", "below high"),
    ("unknown optimizer", ('["adam", "sgd"]', '["adam", "rmsprop"]'), "search.optimizer", "rmsprop"),
    ("negative epochs", ("max_epochs = 3", "max_epochs = -3"), "training.max_epochs", "greater than 0"),
    ("unknown key", ("max_epochs = 3", "max_epochs = 3\nepocs = 3"), "training.epocs", "unknown key"),
    ("not TOML", ("[budget]", "[budget"), "", "not valid TOML"),
    ("bad split", ('dataset = "idx"', 'dataset = "idx"\nsplit = [0.7, 0.2, 0.2]'), "data.split", "sum to 1"),
    ("log of zero", ("low = 1e-3, high = 1e-2, log = true", "low = 0.0, high = 1e-2, log = true"),
     "search.lr", "> 0"),
]


def rejection(tmp_path: Path, edit: tuple[str, str]) -> tuple[Path, str]:
    """The good study file with one edit, and the ConfigError message it must raise."""
    old, new = edit
    assert old in GOOD
    p = tmp_path / "bad.toml"
    p.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    return p, str(e.value)


@pytest.mark.parametrize("what,edit,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_file_is_rejected_with_a_useful_message(tmp_path: Path, what, edit, field, words) -> None:
    p, msg = rejection(tmp_path, edit)
    assert str(p) in msg and field in msg and words in msg, msg


@pytest.mark.parametrize("what,edit,field,words", BAD[:3] + BAD[5:7], ids=[b[0] for b in BAD[:3] + BAD[5:7]])
def test_cli_prints_one_line_and_exits_2_without_touching_storage(tmp_path: Path, what, edit, field, words) -> None:
    old, new = edit
    p = tmp_path / "bad.toml"
    p.write_text(GOOD.replace(old, new, 1))
    r = run_cli("worker", "--study", str(p), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpsearch: error:") and field in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "hpsearch.db").exists()  # rejected before anything touched the storage


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(
        GOOD.replace("max_epochs = 3", "max_epochs = -1\npatience = 0")
        .replace("low = 1e-3, high = 1e-2", "low = 1e-2, high = 1e-3")
        .replace('dataset = "idx"', 'dataset = "imagenet"')
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert len(e.value.problems) == 4, e.value.problems
    assert "4 problems" in str(e.value)


def test_unknown_study_name_lists_the_shipped_ones(tmp_path: Path) -> None:
    r = run_cli("worker", "--study", "no-such-study", cwd=tmp_path)
    assert r.returncode == 2
    assert "no study named 'no-such-study'" in r.stderr and "cnn" in r.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = run_cli("--debug", "worker", "--study", "no-such-study", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_usage_error_is_one_line(tmp_path: Path) -> None:
    r = run_cli("worker", "--study", "cnn", "--n-trials", "zero", cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--n-trials" in r.stderr


def test_fingerprint_ignores_budget_and_data_root(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"
    a.write_text(GOOD)
    b.write_text(GOOD.replace("n_trials = 4", "n_trials = 40").replace('dataset = "idx"', 'dataset = "idx"\nroot = "/x"'))
    c.write_text(GOOD.replace("max_epochs = 3", "max_epochs = 4"))
    assert load_config(a).fingerprint() == load_config(b).fingerprint()
    assert load_config(a).fingerprint() != load_config(c).fingerprint()


def test_readme_documents_every_section_of_the_default_study() -> None:
    readme = (REPO / "README.md").read_text()
    for section in ("[study]", "[data]", "[search]", "[training]", "[sampler]", "[pruner]", "[budget]", "[storage]"):
        assert section in readme, section


LR = "lr = { low = 1e-3, high = 1e-2, log = true }"
OUT_OF_BOUNDS = [
    # (what, edit, field the message names, words it must contain: the bound and its reason)
    ("lr.high = inf", (LR, "lr = { low = 1e-3, high = inf, log = true }"), "search.lr.high", "finite"),
    ("lr = nan", (LR, "lr = nan"), "search.lr", "finite"),
    ("lr = 1e6", (LR, "lr = 1e6"), "search.lr", "overflows the weights"),
    ("weight_decay.high = inf", (LR, LR + "\nweight_decay = { low = 0.0, high = inf }"),
     "search.weight_decay.high", "finite"),
    ("weight_decay = 5", (LR, LR + "\nweight_decay = 5.0"), "search.weight_decay", "drives the weights to zero"),
    ("channels 1e5", (LR, LR + "\nconv1_channels = 100000"), "search.conv1_channels", "gigabytes"),
    ("channel range to 1e11", (LR, LR + "\nconv2_channels = { low = 8, high = 100000000000 }"),
     "search.conv2_channels", "gigabytes"),
    ("dropout = 0.999", (LR, LR + "\ndropout = 0.999"), "search.dropout", "too few activations"),
    ("batch_size choices [1, 2]", (LR, LR + "\nbatch_size = { choices = [1, 2] }"), "search.batch_size",
     "gradient noise"),
    ("max_epochs = 1e11", ("max_epochs = 3", "max_epochs = 1e11"), "training.max_epochs", "run for days"),
    ("patience = 1e11", ("max_epochs = 3", "max_epochs = 3\npatience = 100000000000"), "training.patience",
     "less than or equal to 1000"),
    ("grace_period huge", ("n_trials = 4", "n_trials = 4\n[storage]\ngrace_period = 100000000000"),
     "storage.grace_period", "a day"),
    ("reconnect_timeout = inf", ("n_trials = 4", "n_trials = 4\n[storage]\nreconnect_timeout = inf"),
     "storage.reconnect_timeout", "finite"),
    ("split nan", ('dataset = "idx"', 'dataset = "idx"\nsplit = [0.7, nan, 0.15]'), "data.split", "finite"),
    ("hyperband min_resource > max_epochs",
     ("n_trials = 4", 'n_trials = 4\n[pruner]\ntype = "hyperband"\nmin_resource = 20'),
     "pruner.min_resource=20", "max_epochs=3"),
    ("median warm-up >= max_epochs", ("n_trials = 4", "n_trials = 4\n[pruner]\nn_warmup_steps = 3"),
     "pruner.n_warmup_steps=3", "never prunes"),
]


@pytest.mark.parametrize("what,edit,field,words", OUT_OF_BOUNDS, ids=[b[0] for b in OUT_OF_BOUNDS])
def test_non_finite_and_out_of_bounds_values_are_rejected_with_the_reason(tmp_path: Path, what, edit, field,
                                                                         words) -> None:
    _, msg = rejection(tmp_path, edit)
    assert field in msg and words in msg, msg


def test_bounds_keep_the_shipped_and_sensible_values(tmp_path: Path) -> None:
    p = tmp_path / "edge.toml"
    p.write_text(GOOD.replace(LR, "lr = { low = 1e-4, high = 10.0, log = true }\ndropout = 0.9\n"
                              "conv2_channels = 2048\nbatch_size = { choices = [8, 8192] }")
                 .replace("n_trials = 4", 'n_trials = 4\n[pruner]\ntype = "hyperband"\nmin_resource = 3'))
    cfg = load_config(p)
    assert cfg.search.dropout == 0.9 and cfg.search.conv2_channels == 2048
    assert cfg.pruner.min_resource == cfg.training.max_epochs


def test_every_bound_problem_is_listed_at_once(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(GOOD.replace(LR, "lr = inf\ndropout = 0.99\nconv1_channels = 100000")
                 .replace("max_epochs = 3", "max_epochs = 100000"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert len(e.value.problems) == 4, e.value.problems


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_config(p).study.name == "t"


def test_a_recorded_config_skips_the_newer_bounds(tmp_path: Path) -> None:
    # finalize reads the config back from the study: one made before a bound existed still loads.
    p = tmp_path / "t.toml"
    p.write_text(GOOD)
    raw = load_config(p).model_dump(mode="json")
    raw["search"]["dropout"] = 0.95
    raw["pruner"]["n_warmup_steps"] = 5
    with pytest.raises(ValidationError):
        StudyConfig.model_validate(raw)
    cfg = StudyConfig.model_validate(raw, context={"recorded": True})
    assert cfg.search.dropout == 0.95 and cfg.pruner.n_warmup_steps == 5


def test_sgd_needs_momentum_for_nesterov(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(GOOD.replace(LR, LR + "\nmomentum = 0.0"))  # optimizer choices include sgd
    with pytest.raises(ConfigError, match="momentum must be > 0 when the optimizer may be sgd"):
        load_config(p)
    p.write_text(GOOD.replace(LR, LR + "\nmomentum = 0.0").replace('["adam", "sgd"]', '["adam"]'))
    assert load_config(p).search.momentum == 0.0  # unused by Adam
