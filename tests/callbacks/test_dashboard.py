"""The TensorBoard page opens on the method: the custom-scalars layout is in the fit run's events."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from anatomy_lightning.callbacks.dashboard import METHOD_LAYOUT, DashboardLayout


def written_layout(run_dir: Path) -> layout_pb2.Layout | None:
    """The custom-scalars layout stored in a run folder's event files, if any."""
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "custom_scalars":
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(value.tensor.string_val[0])
                    return layout
    return None


def test_the_layout_puts_the_method_first_and_its_regexes_compile(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version="fit_0")
    DashboardLayout().on_fit_start(SimpleNamespace(is_global_zero=True, loggers=[logger]), None)
    logger.experiment.flush()
    layout = written_layout(tmp_path / "run" / "fit_0")
    assert layout is not None
    assert [c.title for c in layout.category] == list(METHOD_LAYOUT)  # reward first, augmentation last
    tags = ["train/reward", "train/reward_std", "val/acc", "val/acc_stage_2", "curriculum/stage",
            "curriculum/batch_similarity", "signal/invalid_all_wrong", "train/invalid_all_right", "train/kl",
            "augment/batch_share", "augment/dropped"]
    regexes = [re.compile(t) for c in layout.category for chart in c.chart for t in chart.multiline.tag]
    assert all(any(r.search(tag) for r in regexes) for tag in tags)
    assert not any(r.search("augment/queue_size_total_extra") for r in regexes)  # anchored, not prefixes

