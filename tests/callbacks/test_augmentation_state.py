"""The GDQA queue in a checkpoint stores image paths relative to the run folder, so a run folder
that was moved or copied still resumes (absolute paths used to point into the old folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from anatomy_lightning.callbacks.augmentation import GroupDiversityCallback
from anatomy_lightning.data.schema import Question


def _queued(callback: GroupDiversityCallback, images: list[str]) -> None:
    callback.augmenter.queue.append(Question("q0#aug1", "Which organ?", ["Liver", "Gut"], 0, images=images))


def test_queued_image_paths_follow_a_moved_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new, elsewhere = tmp_path / "old", tmp_path / "new", tmp_path / "shared" / "b.png"
    (old / "outputs").mkdir(parents=True)
    (old / "outputs" / "a.png").write_bytes(b"png")
    monkeypatch.chdir(old)
    saving = GroupDiversityCallback(encoder="jaccard")
    _queued(saving, [str(old / "outputs" / "a.png"), str(elsewhere)])
    torch.save(saving.state_dict(), old / "state.pt")
    stored = torch.load(old / "state.pt", weights_only=True)["augmenter"]["queue"][0]["record"]["images"]
    assert stored == ["<run>/outputs/a.png", str(elsewhere)]  # outside the run: left absolute

    shutil.move(old, new)
    monkeypatch.chdir(new)
    loading = GroupDiversityCallback(encoder="jaccard")
    loading.load_state_dict(torch.load(new / "state.pt", weights_only=True))
    [question] = loading.augmenter.queue
    assert question.images == [str(new / "outputs" / "a.png"), str(elsewhere)]
    assert Path(question.images[0]).is_file()


def test_checkpoints_of_the_previous_format_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    saving = GroupDiversityCallback(encoder="jaccard")
    _queued(saving, ["/data/a.png"])
    old_format = {"augmenter": saving.augmenter.state_dict()}  # absolute paths, no "<run>/"
    loading = GroupDiversityCallback(encoder="jaccard")
    loading.load_state_dict(old_format)
    assert loading.augmenter.queue[0].images == ["/data/a.png"]
