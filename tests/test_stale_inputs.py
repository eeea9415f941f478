"""A rerun never returns a result computed from other inputs (ibridge/stage_inputs.py).

The same command finds its run folder again and skips what finished; when the data's content,
a model's files or the code changed since, the finished stage or evaluation must say so and
refuse to be skipped, and the earlier results must stay as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_cli_smoke import ibridge

# The pieces are imported in the tests that use them, so that the CLI tests above them also run
# (and fail) on code that predates ibridge/stage_inputs.py.

PROMPTS = ["sort 3 1 2", "reverse 4 5 6", "max 7 2 9", "min 5 8 1", "sort 9 0 4 2", "reverse 1 2"]
RESPONSES = ["1 2 3", "6 5 4", "9", "1", "0 2 4 9", "2 1"]


def write_demos(path: Path, responses: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, responses,
                                                                                           strict=True)))
    return path


TRAIN = ["train", "debug=smoke", "trainer.num_threads=1", "logger=none", "data=jsonl", "data.path=demos.jsonl",
         "sft.max_steps=2", "sft.batch_size=2", "hydra.run.dir=run"]


@pytest.mark.slow
def test_edited_data_is_not_skipped_and_the_earlier_result_is_kept(tmp_path, model_cache):
    """The issue's case: every response of the data.path JSONL edited, the same `ibridge train`
    run again. Before inputs were recorded this printed "sft: finished earlier; skipping"."""
    write_demos(tmp_path / "demos.jsonl", RESPONSES)
    ibridge(TRAIN, tmp_path, model_cache)
    run = tmp_path / "run"
    stage_record, results = run / "sft" / "stage.json", run / "results.json"
    finished_at = stage_record.stat().st_mtime_ns

    # unchanged: skipped, as before
    again = ibridge(TRAIN, tmp_path, model_cache)
    assert "finished earlier" in again.stdout + again.stderr
    assert stage_record.stat().st_mtime_ns == finished_at
    first_results = results.read_text()

    # every response edited: refused in one line that names the file, nothing overwritten
    write_demos(tmp_path / "demos.jsonl", [" ".join(reversed(r.split())) + " 0" for r in RESPONSES])
    proc = ibridge(TRAIN, tmp_path, model_cache, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert message.count("\n") == 0, message
    assert message.startswith("ibridge: stale run: sft in ") and "data.path: demos.jsonl changed" in message
    assert "resume=false" in message and "Traceback" not in message
    assert stage_record.stat().st_mtime_ns == finished_at
    assert results.read_text() == first_results, "the earlier run's results.json was overwritten"

    # resume=false: the earlier run moves aside and the stage trains on the new data
    ibridge([*TRAIN, "resume=false"], tmp_path, model_cache)
    assert len(list(tmp_path.glob("run.bak-*"))) == 1
    assert json.loads(results.read_text())["status"] == "completed"
    assert stage_record.stat().st_mtime_ns != finished_at


@pytest.mark.slow
def test_an_evaluation_of_a_retrained_checkpoint_is_not_skipped(smoke_run, tmp_path, model_cache):
    """`ibridge eval checkpoint=X` run again after X was overwritten (trained again in place)."""
    results = json.loads((smoke_run / "results.json").read_text())
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(results["stages"]["sft"]["checkpoint"], checkpoint)
    args = ["eval", "debug=smoke", "trainer.num_threads=1", "logger=none", "eval.num_prompts=8",
            f"checkpoint={checkpoint}", "hydra.run.dir=ev"]
    ibridge(args, tmp_path, model_cache)
    marker = tmp_path / "ev" / "eval" / "checkpoint" / "eval.json"
    done_at = marker.stat().st_mtime_ns
    ibridge(args, tmp_path, model_cache)
    assert marker.stat().st_mtime_ns == done_at  # same inputs: skipped

    dpo = Path(results["stages"]["dpo"]["checkpoint"])
    shutil.copyfile(dpo / "model.safetensors", checkpoint / "model.safetensors")
    proc = ibridge(args, tmp_path, model_cache, check=False)
    assert proc.returncode == 2
    assert "the checkpoint evaluation in" in proc.stderr and "policy model: weights changed" in proc.stderr
    assert marker.stat().st_mtime_ns == done_at


# --------------------------------------------------------------------------- the record, by hand


def _source(path: Path):
    from ibridge.data import source_for

    return source_for({"kind": "jsonl", "examples": "demonstrations", "path": str(path)})


def test_data_inputs_follow_the_content_not_the_file_times(tmp_path):
    import os

    from ibridge import stage_inputs
    from ibridge.stage_inputs import changes, data_inputs

    demos = write_demos(tmp_path / "demos.jsonl", RESPONSES)
    first = data_inputs(_source(demos), stage_inputs.SFT_KINDS)
    os.utime(demos, (1, 1))  # touched: same bytes, same inputs
    assert data_inputs(_source(demos), stage_inputs.SFT_KINDS) == first
    write_demos(demos, [*RESPONSES[:-1], "1 2"])  # one response edited
    second = data_inputs(_source(demos), stage_inputs.SFT_KINDS)
    assert second != first
    assert changes({"data": first}, {"data": second}) == ["data.path: demos.jsonl changed"]


def test_a_folder_of_files_records_each_file(tmp_path):
    from ibridge.stage_inputs import changes, data_inputs

    folder = tmp_path / "data"
    folder.mkdir()
    write_demos(folder / "train.jsonl", RESPONSES)
    (folder / "README.md").write_text("not data")
    record = data_inputs(_source(folder), ("demonstrations",))
    assert set(record["data"]["path"]) == {"train.jsonl"}
    write_demos(folder / "more.jsonl", RESPONSES)  # a file added to the folder is read too: an input
    added = data_inputs(_source(folder), ("demonstrations",))
    assert changes({"data": record}, {"data": added}) == ["data.path: more.jsonl added"]


def test_the_toy_world_is_recorded_by_its_config():
    from ibridge import stage_inputs
    from ibridge.data import source_for
    from ibridge.stage_inputs import changes, data_inputs
    from tests.conftest import compose_config

    cfg = compose_config(["debug=smoke"])
    record = data_inputs(source_for(cfg.data), stage_inputs.SFT_KINDS)
    other = data_inputs(source_for(compose_config(["debug=smoke", "data.world.seed=3"]).data), stage_inputs.SFT_KINDS)
    assert record["data"]["world"]["seed"] == 0 and changes(record, other) == ["data.world.seed: 0 -> 3"]


def test_model_inputs_cover_weights_and_tokenizer(tmp_path):
    from ibridge.stage_inputs import changes, model_inputs
    from tests.test_data_encoding import build_model_dir

    model = build_model_dir(tmp_path / "model")
    first = model_inputs(model)
    assert first["weights"] and "tokenizer.json" in first["tokenizer"]
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    second = model_inputs(model)
    assert second["weights"] == first["weights"]
    assert changes({"models": {"init": first}}, {"models": {"init": second}}) == [
        "init model: tokenizer/tokenizer_config.json changed"]


def test_refusals_name_what_changed_and_what_to_do(tmp_path):
    from ibridge import stage_inputs
    from ibridge.stage_inputs import StaleRunError, refuse_if_changed

    record = {"data": {"data": {"world": {"seed": 0}}}, "models": {"init": {"weights": "a", "tokenizer": {}}},
              "code": {"ibridge numerics": 1, "torch": "2.4.0", "transformers": "4.56.0"}}
    stage_inputs.record_inputs(tmp_path / "sft", record)
    refuse_if_changed(tmp_path / "sft", record, "sft", tmp_path, finished=True)  # same inputs: no error
    newer = {**record, "code": {**record["code"], "torch": "2.5.0"}, "models": {"init": {"weights": "b", "tokenizer": {}}}}
    with pytest.raises(StaleRunError) as caught:
        refuse_if_changed(tmp_path / "sft", newer, "sft", tmp_path / "run", finished=True)
    message = str(caught.value)
    assert "torch 2.4.0 -> 2.5.0" in message and "init model: weights changed" in message
    assert "not skipped" in message and "resume=false" in message and "run.bak-<time>" in message
    with pytest.raises(StaleRunError, match="stopped part-way .* not resumed"):
        refuse_if_changed(tmp_path / "sft", newer, "sft", tmp_path / "run", finished=False)
    # a finished stage without a record (an older ibridge wrote it) cannot be vouched for
    with pytest.raises(StaleRunError, match="did not record its inputs"):
        refuse_if_changed(tmp_path / "dpo", record, "dpo", tmp_path / "run", finished=True)


@pytest.mark.slow
def test_a_sweep_cell_whose_data_changed_is_recorded_as_stale(tmp_path, model_cache):
    """Cells run again in the same sweep folder: each refuses and says so in its results.json,
    which the sweep's summary and `ibridge report` read."""
    write_demos(tmp_path / "demos.jsonl", RESPONSES)
    sweep = ["-m", *[a for a in TRAIN if not a.startswith("hydra.")], "seed=0,1", "hydra.sweep.dir=sw"]
    ibridge(sweep, tmp_path, model_cache)
    write_demos(tmp_path / "demos.jsonl", [*RESPONSES[:-1], "1 2 0"])
    proc = ibridge(sweep, tmp_path, model_cache)  # a sweep goes on past a failed cell: exit 0
    cells = sorted((tmp_path / "sw").glob("*/results.json"))
    assert len(cells) == 2
    for path in cells:
        results = json.loads(path.read_text())
        assert results["status"] == "failed" and results["error"].startswith("stale run: sft in ")
        assert "data.path: demos.jsonl changed" in results["error"]
    assert proc.stdout.count("stale run") + proc.stderr.count("stale run") >= 2


def test_a_large_data_files_digest_is_kept_in_the_cache_not_in_the_data_folder(tmp_path, monkeypatch):
    """A sidecar .json beside the data would itself be read as data by a folder source."""
    from ibridge import fingerprint, stage_inputs
    from ibridge.stage_inputs import data_inputs

    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 16)  # every file counts as large
    folder = tmp_path / "data"
    folder.mkdir()
    write_demos(folder / "train.jsonl", RESPONSES)
    first = data_inputs(_source(folder), stage_inputs.SFT_KINDS, tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl"]
    assert list((tmp_path / "cache").rglob("*.json"))  # the digest, kept once
    assert data_inputs(_source(folder), stage_inputs.SFT_KINDS, tmp_path / "cache") == first
    write_demos(folder / "train.jsonl", [*RESPONSES[:-1], "1 2"])  # new bytes, new stamp: hashed again
    assert data_inputs(_source(folder), stage_inputs.SFT_KINDS, tmp_path / "cache") != first
