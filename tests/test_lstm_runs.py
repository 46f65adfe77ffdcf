"""The language model end to end: options, problem, worker step, train / run / sim, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from helpers import cli, lines_of, read_events, run_zsgd
from zsgd.core.config import LM_DEFAULTS, TrainConfig
from zsgd.core.ledger import perplexity
from zsgd.core.problem import Problem
from zsgd.core.stopping import StopRule
from zsgd.errors import ZsgdError

TINY = ["--model", "lstm:embed=8,hidden=16,layers=1", "--bptt", "16", "--batch-size", "4"]


@pytest.fixture
def corpus(tmp_path):
    """A small learnable text: a few sentences repeated with variations."""
    lines = [f"the {a} {b} over the {c} dog number {i % 7}." for i, (a, b, c) in
             enumerate(zip(["quick", "slow", "red"] * 40, ["fox jumps", "cat runs", "owl flies"] * 40,
                           ["lazy", "tired", "sleepy", "happy"] * 30))]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- in process


def test_problem_for_lstm_defaults_to_the_embedded_text_in_contiguous_spans():
    cfg = TrainConfig(model="lstm:embed=8,hidden=16,layers=1", split="iid").validate()
    problem = Problem.from_config(cfg)
    assert cfg.data == "text:embedded" and cfg.split == "shards"
    assert problem.is_language_model and problem.samples_per_step(cfg) == cfg.batch_size * cfg.bptt
    assert problem.model.n_classes == problem.dataset.n_classes
    assert problem.stop_rule(cfg).total_updates == math.ceil(len(problem.dataset.train) / (64 * 64))
    assert problem.data_fields()["vocab_size"] == problem.dataset.n_classes
    with pytest.raises(ZsgdError, match="needs text data"):
        Problem.from_config(TrainConfig(model="lstm", data="embedded").validate())
    with pytest.raises(ZsgdError, match="use --model lstm"):
        Problem.from_config(TrainConfig(model="mlp", data="text").validate())


def test_worker_step_carries_state_and_counts_tokens(corpus):
    from zsgd.algorithms.worker import WorkerStep

    cfg = TrainConfig(model="lstm:embed=8,hidden=16,layers=1", data=f"text:{corpus}", bptt=16, batch_size=4).validate()
    problem = Problem.from_config(cfg)
    ds, model = problem.dataset, problem.model
    step = WorkerStep(model, ds.x_train, ds.y_train, 4, 0, 0)
    w = model.init(0)
    first = step.compute(w, 0)
    assert first.n_samples == 4 * 16 and np.isfinite(first.loss)
    assert step.state.h.any()  # the state was carried out of the block
    per_pass = step.tokens.blocks_per_pass
    for _ in range(per_pass - 1):
        step.compute(w, 0)
    h_end = step.state.h.copy()
    again = step.compute(w, 0)  # the stream starts over: reset, so the very first block's loss again
    assert again.loss == pytest.approx(first.loss, rel=1e-6) and not np.allclose(h_end, 0)


def test_target_perplexity_stop_rule_and_validation():
    rule = StopRule(n_train=1000, batch_size=10, target_ppl=5.0)
    assert rule.total_updates is None
    assert rule.reason(1, 10, 1.0, test_acc=0.3, test_loss=math.log(6.0)) is None
    assert "perplexity 5" in rule.reason(1, 10, 1.0, test_acc=0.3, test_loss=math.log(4.9))
    assert rule.reason(1, 10, 1.0, test_acc=0.3, test_loss=float("nan")) is None
    assert perplexity(1e9) == float("inf") and perplexity(0.0) == 1.0
    for bad in (dict(target_ppl=0.5), dict(bptt=0), dict(tokens="subwords")):
        with pytest.raises(ZsgdError):
            TrainConfig(**bad).validate()


# ---------------------------------------------------------------- commands


def test_train_lstm_writes_perplexity_and_tokens_per_s(tmp_path, corpus):
    out = tmp_path / "run"
    r = cli("train", *TINY, "--data", f"text:{corpus}", "--lr", "0.02", "--steps", "150", "--eval-every", "75", "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["tokens_per_s"] == summary["samples_per_s"]
    assert summary["samples"] == 150 * 4 * 16
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    config = yaml.safe_load((out / "config.yaml").read_text())
    # the language model's defaults where the user chose nothing, the user's value where they did
    assert config["optimizer"] == LM_DEFAULTS["optimizer"] and config["clip_norm"] == LM_DEFAULTS["clip_norm"]
    assert config["lr"] == 0.02
    assert config["batch_size"] == 4 and config["split"] == "shards" and config["vocab_size"] > 10
    evals = [e for e in read_events(out) if e["event"] == "eval"]
    assert len(evals) >= 2 and all("test_perplexity" in e for e in evals)
    unigram = __import__("zsgd.data.text", fromlist=["load_text"]).load_text(corpus).unigram_perplexity()
    assert summary["test_perplexity"] < 0.6 * unigram  # it learned something beyond letter frequencies
    assert (out / "curves_vs_time.png").is_file()


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64), "binary"),
    (b"just a few words, far too few for a sequence\n" * 2, "shorter than one sequence"),
])
def test_bad_text_is_one_line_exit_2(tmp_path, content, needle):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    r = cli("train", "--model", "lstm:embed=8,hidden=16,layers=1", "--data", f"text:{f}", "--steps", "2", "--out", str(tmp_path / "o"), "-q")
    assert r.exit_code == 2, r.output
    lines = lines_of(r.stderr)
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_sim_measures_the_lstm_step(tmp_path, corpus):
    out = tmp_path / "sim"
    r = cli("sim", *TINY, "--data", f"text:{corpus}", "--workers", "3", "--algo", "async", "--compute", "measured",
            "--steps", "30", "--eval-every", "15", "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    summaries = list(out.rglob("summary.json"))
    assert summaries
    s = json.loads(summaries[0].read_text())
    assert s["compute_measured"] and s["compute_s"] > 0
    assert s["tokens_per_s"] > 0 and math.isfinite(s["test_perplexity"])


def test_sim_grid_with_a_given_step_time(tmp_path, corpus):
    """A grid with a fixed --compute (nothing to time) still compiles the kernels once before its arms
    fork, on a language model's own tokens (it once fed the LSTM image pixels: a traceback)."""
    out = tmp_path / "sim"
    r = cli("sim", *TINY, "--data", f"text:{corpus}", "--workers", "1,2", "--compute", "77ms", "--broker-time", "1ms",
            "--steps", "8", "--eval-every", "1000000", "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    summaries = sorted(out.rglob("summary.json"))
    assert len(summaries) == 2
    assert all(json.loads(p.read_text())["tokens_per_s"] > 0 for p in summaries)


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra", [("async", []), ("localsgd:4", []), ("dsgd", []),
                                        ("ssp:2", ["--compress", "topk:0.05", "--compress-replies", "topk:0.1"])])
def test_run_lstm_with_workers(tmp_path, corpus, algo, extra, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "2", "--algo", algo, *extra, *TINY, "--data", f"text:{corpus}", "--steps", "24",
                    "--heartbeat", "0.5", "--timeout", "5", "--no-plots", "--out", str(out), "-q", timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and math.isfinite(summary["test_perplexity"])
    if algo in ("async", "ssp:2"):  # one update is one worker's block of 4 streams x 16 tokens
        assert summary["samples"] == summary["updates"] * 4 * 16
    if extra:
        assert summary["compression_ratio"] > 5 and summary["reply_compression_ratio"] > 2


@pytest.mark.slow
def test_resume_on_another_vocabulary_is_refused(tmp_path, corpus, no_orphans):
    out = tmp_path / "run"
    proc = run_zsgd("run", "--n-proc", "1", *TINY, "--data", f"text:{corpus}", "--steps", "6", "--checkpoint-every", "3",
                    "--heartbeat", "0.5", "--timeout", "5", "--no-plots", "--out", str(out), "-q", timeout=200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    corpus.write_text(corpus.read_text() + "Zebras & quaggas!\n")  # new characters: another vocabulary
    proc = cli("run", "--resume", str(out), "--steps", "12", "-q")  # refused before anything starts: in-process
    assert proc.exit_code == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "vocabulary differs" in lines[0]
