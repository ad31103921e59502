"""Every YAML under jobs/configs/ builds its config, as the job that reads it would: a misspelt
key or a value the config refuses fails here rather than minutes into a cluster job."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
sys.path.append(str(REPO / "jobs"))  # after the repo root: jobs/serve.py must not shadow serve/


def _yamls(prefix: str) -> list[Path]:
    return sorted(CONFIGS.glob(f"{prefix}*.yaml"))


def _stream_stage_configs() -> set[str]:
    """Stage-1 YAMLs that a speedrun YAML runs on its stream of rendered pages."""
    import speedrun

    runs = [speedrun.load_config(str(path)) for path in _yamls("speedrun_")]
    return {Path(run.stage1_config).name for run in runs if run.stream_pages}


def test_every_config_has_a_loader():
    kinds = ("speedrun_", "stage1_", "stage2_", "preprocess_")
    assert _yamls(""), CONFIGS
    assert [p.name for p in _yamls("") if not p.name.startswith(kinds)] == []


@pytest.mark.parametrize("path", _yamls("speedrun_"), ids=lambda p: p.stem)
def test_speedrun_configs_build_their_stages(path, tmp_path):
    import speedrun

    run = speedrun.load_config(str(path), out=str(tmp_path))
    for stage in run.stages:
        cfg = speedrun.stage_config(run, stage)
        assert cfg.stage == stage and cfg.preset == run.preset
        assert Path(cfg.export_dir).is_relative_to(tmp_path)
        if stage == 1 and run.stream_pages:
            assert cfg.synth is not None and cfg.synth.mode == run.mode


@pytest.mark.parametrize("path", _yamls("stage1_") + _yamls("stage2_"), ids=lambda p: p.stem)
def test_stage_configs_build_alone(path):
    """As jobs/stage1.py and jobs/stage2.py read them. A stream recipe's YAML (glyph_loss) is only
    complete under its speedrun's stream, built above."""
    from pipeline.train import load_train_config

    stage = int(path.name[5])
    try:
        cfg = load_train_config(str(path), stage=stage)
    except ValueError as exc:
        assert "synth stream" in str(exc) and path.name in _stream_stage_configs(), exc
        return
    assert cfg.stage == stage


@pytest.mark.parametrize("path", _yamls("preprocess_"), ids=lambda p: p.stem)
def test_preprocess_configs_build(path):
    from pipeline.preprocess import load_preprocess_config

    cfg = load_preprocess_config(str(path))
    assert cfg.mode and cfg.out
